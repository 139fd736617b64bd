"""Gin layers: defaults -> method -> scale -> the method's shrink for that scale -> table ->
launcher -> --bind, with stable run ids and `--explain`."""

import json
from pathlib import Path

import pytest

from harness import ginutil, sweep
from tests.conftest import REPO

# Ids every table planned before the layers existed (at f353cef, when each method's gin file
# came first and gin/scale/embedded.gin held every method's shrink), keyed "table [overlay]" ->
# "method/seed/swept" -> [pretrain id, run id]; written by planning each gin/table*.gin alone
# and with gin/scale/smoke.gin (harness.sweep.plan) on that revision.
BEFORE = json.loads((REPO / "tests" / "data" / "run_ids_f353cef.json").read_text())
# pixels is the one method whose resolved config changed: gin/base.gin binds
# views.Augment.size for every run, and pixels' own file did not (it draws no views).
CHANGED = {"pixels"}
# Tables whose protocols changed since (issue 13 gave table2 its embedded budgets and moved
# fine-tuning and detection to their own tables): their pretraining ids must still match,
# their run ids (which hash the protocols) may not.
PROTOCOLS_CHANGED = {"table2.gin", "table2.gin gin/scale/smoke.gin"}


@pytest.mark.parametrize("table", sorted(BEFORE))
def test_the_layers_keep_every_run_id_of_the_old_layout(table):
    files = table.split()
    _, specs = sweep.plan([f"gin/{files[0]}", *files[1:]], [], None, "/nonexistent/results")
    now = {f"{s.method}/{s.seed}/{json.dumps(dict(s.swept), sort_keys=True)}": [s.pretrain_id, s.run_id] for s in specs}
    assert set(now) == set(BEFORE[table])
    if table in PROTOCOLS_CHANGED:
        now = {k: [v[0], BEFORE[table][k][1]] for k, v in now.items()}
    moved = {k for k in now if now[k] != BEFORE[table][k]}
    assert {k.split("/")[0] for k in moved} <= CHANGED
    assert len(moved) < len(now)


def test_run_files_are_layered_and_a_shrink_reaches_only_its_method():
    swav = ginutil.run_files("swav", "embedded", ["gin/table_joint.gin", "gin/scale/smoke.gin"])
    rel = [str(Path(f).relative_to(REPO)) if Path(f).is_absolute() else f for f in swav]
    assert rel == [
        "gin/base.gin",
        "gin/methods/swav.gin",
        "gin/scale/embedded.gin",
        "gin/scale/embedded/swav.gin",
        "gin/table_joint.gin",
        "gin/scale/smoke.gin",
    ]
    assert "gin/scale/smoke/random.gin" in [
        str(Path(f).relative_to(REPO))
        for f in ginutil.run_files("random", "embedded", [str(REPO / "gin/scale/smoke.gin")])
    ]
    ginutil.parse(swav)
    assert ginutil.reference("swav.SwAV.num_prototypes") == 100  # the shrink overrides the paper's 3000
    ginutil.parse(ginutil.run_files("simclr", "embedded", ["gin/table1.gin"]))
    assert not any("swav" in k for k in ginutil.settings())  # another method's shrink is not even parsed
    assert ginutil.reference("trainer.Trainer.batch_size") == 128  # the scale overrides the paper's 4096


def test_explain_names_the_file_that_set_a_value(capsys):
    rc = sweep.main(
        [
            "gin/table_joint.gin",
            "--dry-run",
            "--only",
            "swav",
            "--bind",
            "table.Table.seeds = [0]",
            "--explain",
            "swav.SwAV.num_prototypes",
            "--explain",
            "trainer.Trainer.max_steps",
            "--bind",
            "trainer.Trainer.epochs = 2",
            "--explain",
            "trainer.Trainer.epochs",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (
        "swav.SwAV.num_prototypes = 100   (set by gin/scale/embedded/swav.gin, line 3; overrides "
        "gin/methods/swav.gin, line" in out
    )
    assert "trainer.Trainer.max_steps: bound by no file or --bind" in out
    assert (
        "trainer.Trainer.epochs = 2   (set by --bind 'trainer.Trainer.epochs = 2'; overrides gin/methods/swav.gin"
        in out
        and "gin/scale/embedded.gin, line" in out
    )


def test_an_unknown_scale_names_the_known_ones(capsys, tmp_path):
    rc = sweep.main(["gin/table1.gin", "--dry-run", "--bind", "table.Table.scale = 'imagenet9000'"])
    err = capsys.readouterr().err
    assert rc == 2 and "table.Table.scale = 'imagenet9000'" in err and "embedded" in err and "smoke" in err
