"""The sweep CLI: planning, stable ids, filters, errors, skip-if-done and pretraining reuse."""

import json
import re

import pytest

from harness import sweep
from tests.test_data import write_fake_fmnist

TABLE = "gin/table1.gin"


def run(capsys, *args: str) -> tuple[int, str]:
    rc = sweep.main(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


def dry(capsys, *args: str) -> list[dict]:
    rc, out = run(capsys, TABLE, "--dry-run", "--results", "/nonexistent/sslbench-results", *args)
    assert rc == 0, out
    rows = []
    for line in out.splitlines():
        m = re.match(r"(\w+)\s+(\d+)\s+([0-9a-f]{12})\s+([0-9a-f]{12})\s+(\w+)\s*(.*)$", line)
        if m:
            rows.append(dict(zip(("method", "seed", "run", "pre", "status", "swept"), m.groups())))
    return rows


def test_dry_run_lists_every_method_and_seed(capsys):
    rows = dry(capsys)
    assert len(rows) == 10
    assert {r["method"] for r in rows} == {"supervised", "random", "pixels", "rotnet", "simclr"}
    assert {r["seed"] for r in rows} == {"0", "1"}
    assert len({r["run"] for r in rows}) == 10 and all(r["status"] == "todo" for r in rows)


def test_run_ids_are_stable_and_follow_the_settings(capsys):
    base = {(r["method"], r["seed"]): r for r in dry(capsys)}
    again = {(r["method"], r["seed"]): r for r in dry(capsys)}
    assert base == again
    # An evaluation setting: same pretraining, new runs.
    ev = {(r["method"], r["seed"]): r for r in dry(capsys, "--bind", "knn.KNN.temperature = 0.05")}
    assert all(ev[k]["pre"] == base[k]["pre"] and ev[k]["run"] != base[k]["run"] for k in base)
    # A pretraining setting of one method: only that method's ids move.
    lr = {(r["method"], r["seed"]): r for r in dry(capsys, "--bind", "simclr.SimCLR.temperature = 0.5")}
    assert all((lr[k]["pre"] != base[k]["pre"]) == (k[0] == "simclr") for k in base)
    # The launcher changes nothing.
    la = {(r["method"], r["seed"]): r for r in dry(capsys, "--bind", "launch.Local.parallel = 2")}
    assert la == base
    # Bindings that no run reaches from job.run change nothing: another method's task list that
    # references other methods (multitask), a scoped binding no reference enters.
    other = {
        (r["method"], r["seed"]): r
        for r in dry(
            capsys,
            "--bind",
            "multitask.MultiTask.tasks = [@relative_location.RelativeLocation, @exemplar.Exemplar]",
            "--bind",
            "relative_location.RelativeLocation.min_patch = 12",
            "--bind",
            "unused/simclr.SimCLR.temperature = 0.9",
        )
    }
    assert other == base
    # ... but a method reached through the run's own task list does.
    scoped = {
        (r["method"], r["seed"]): r
        for r in dry(
            capsys,
            "--bind",
            "table.Table.methods = ['multitask']",
            "--bind",
            "multitask.MultiTask.tasks = [@exemplar.Exemplar]",
        )
    }
    moved = {
        (r["method"], r["seed"]): r
        for r in dry(
            capsys,
            "--bind",
            "table.Table.methods = ['multitask']",
            "--bind",
            "multitask.MultiTask.tasks = [@exemplar.Exemplar]",
            "--bind",
            "exemplar.Exemplar.num_surrogate = 100",
        )
    }
    assert all(moved[k]["pre"] != scoped[k]["pre"] for k in scoped)


def test_only_and_sweep(capsys):
    rows = dry(capsys, "--only", "simclr", "--bind", "table.Table.sweep = {'simclr.SimCLR.temperature': [0.1, 0.5]}")
    assert len(rows) == 4 and {r["method"] for r in rows} == {"simclr"}
    assert {r["swept"] for r in rows} == {
        "{'simclr.SimCLR.temperature': '0.1'}",
        "{'simclr.SimCLR.temperature': '0.5'}",
    }


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--only", "simclrr"), "Did you mean simclr"),
        (("--bind", "trainer.Trainer.epoch = 3"), "did you mean epochs"),
        (("--bind", "trainer.Trainr.epochs = 3"), "did you mean trainer.Trainer"),
        (("--bind", "table.Table.methods = ['simclr', 'byol2']"), "unknown method 'byol2'"),
    ],
)
def test_bad_input_fails_before_anything_runs(capsys, tmp_path, args, expected):
    rc, out = run(capsys, TABLE, "--results", str(tmp_path), *args)
    assert rc == 2 and expected in out
    assert not any(tmp_path.rglob("run.json"))


def test_gin_syntax_error_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("# a comment\ntrainer.Trainer.epochs = = 3\n")
    rc, out = run(capsys, TABLE, str(bad), "--dry-run")
    assert rc == 2 and "bad.gin" in out and "line 2" in out


@pytest.fixture
def fake_data(tmp_path):
    write_fake_fmnist(tmp_path / "data", n_train=300, n_test=100)
    return [
        "gin/scale/smoke.gin",
        "--bind",
        f"data.FashionMNIST.root = '{tmp_path / 'data'}'",
        "--bind",
        "data.FashionMNIST.download = False",
        "--results",
        str(tmp_path / "results"),
    ]


def test_finished_runs_are_skipped_and_pretraining_is_reused(capsys, tmp_path, fake_data):
    args = [
        TABLE,
        *fake_data,
        "--only",
        "random",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "job.run.evaluations = [@knn.KNN()]",
    ]
    rc, out = run(capsys, *args)
    assert rc == 0, out
    (run_json,) = (tmp_path / "results" / "table1" / "runs").glob("*/run.json")
    rec = json.loads(run_json.read_text())
    assert rec["status"] == "done" and set(rec["metrics"]) == {"knn/top1@20", "knn/top1@200"}
    pre_json = tmp_path / "results" / "pretrain" / rec["pretrain_id"] / "pretrain.json"
    stamp = (run_json.stat().st_mtime_ns, pre_json.stat().st_mtime_ns)

    rc, out = run(capsys, *args)  # again: nothing runs
    assert rc == 0 and "0 to run" in out
    assert (run_json.stat().st_mtime_ns, pre_json.stat().st_mtime_ns) == stamp

    # An evaluation added later: a new run that reuses the pretrained encoder.
    rc, out = run(capsys, *args[:-2], "--bind", "job.run.evaluations = [@knn.KNN(), @linear.LinearProbe()]")
    assert rc == 0, out
    assert "already done: reusing" in out and pre_json.stat().st_mtime_ns == stamp[1]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "results" / "table1" / "runs").glob("*/run.json")]
    assert len(runs) == 2 and {r["pretrain_id"] for r in runs} == {rec["pretrain_id"]}
    assert (tmp_path / "results" / "table1" / "leaderboard.md").exists()


def test_a_failing_run_is_recorded_and_the_sweep_exits_nonzero(capsys, tmp_path, fake_data):
    rc, out = run(
        capsys,
        TABLE,
        *fake_data,
        "--only",
        "supervised",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "trainer.Trainer.base_lr = 1e30",
        "--bind",
        "optim.SGD.momentum = 0.0",
    )
    assert rc == 1 and "FAILED supervised" in out
    (run_json,) = (tmp_path / "results" / "table1" / "runs").glob("*/run.json")
    rec = json.loads(run_json.read_text())
    assert rec["status"] == "failed" and "NonFiniteLoss" in rec["error"] and "at step" in rec["error"]
    assert rec["metrics"] == {} and rec["log"]
    assert "Failed runs" in (tmp_path / "results" / "table1" / "leaderboard.md").read_text()


def test_unwritable_results_folder(capsys, tmp_path, fake_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a results root below a file can never be created (even as root)
    rc, out = run(capsys, TABLE, *fake_data[:-2], "--results", str(blocker / "results"), "--only", "pixels")
    assert rc == 2 and "not writable" in out and str(blocker) in out


def test_stale_markers_are_ignored(capsys, tmp_path):
    """A queued.json whose job is gone is todo; a 'running' record whose process is gone (its lock
    is free) is interrupted, with 'killed' as its reason; both are run again."""
    rows = dry(capsys, "--only", "pixels")
    results = tmp_path / "results"
    for row, what in zip(rows, ("marker", "record")):
        folder = results / "table1" / "runs" / row["run"]
        folder.mkdir(parents=True)
        if what == "marker":
            (folder / "queued.json").write_text(json.dumps({"job_id": "987654321_0", "log": "x"}))
        else:
            (folder / "run.json").write_text(
                json.dumps(
                    {
                        "status": "running",
                        "host": __import__("socket").gethostname(),
                        "pid": 2**22 + 17,
                        "run_id": row["run"],
                        "method": "pixels",
                    }
                )
            )
    rc, out = run(capsys, TABLE, "--status", "--only", "pixels", "--results", str(results))
    assert rc == 0 and out.count("stale: its job is no longer queued or running") == 1
    assert re.search(r"interrupted\s+killed: the process died", out)
    assert "2 to run" in out


def test_missing_dataset_folder_stops_the_sweep_before_any_job(capsys, tmp_path, fake_data):
    """Checked before launching: exit 2, the path and the key in one message, nothing written."""
    missing = tmp_path / "no-such-imagenet"
    args = [
        TABLE,
        *fake_data,
        "--only",
        "supervised",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "job.run.dataset = @data.ImageFolder()",
        "--bind",
        f"data.ImageFolder.root = '{missing}'",
    ]
    rc, out = run(capsys, *args)
    assert rc == 2 and f"image folder not found: {missing}" in out and "data.ImageFolder.root" in out
    assert not (tmp_path / "results").exists()
    assert run(capsys, *args) == (rc, out)  # the same message on a re-run


def test_squeue_is_asked_only_when_a_run_was_submitted_to_slurm(capsys, tmp_path, monkeypatch):
    """Where SLURM is installed but its controller is down, squeue waits ~9 s before failing:
    a sweep with no SLURM marker must not ask it (a recording squeue first on PATH)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho called >> {calls}\nexit 1\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    results = tmp_path / "results"
    rc, out = run(capsys, TABLE, "--status", "--only", "pixels", "--results", str(results))
    assert rc == 0 and not calls.exists(), out
    row = dry(capsys, "--only", "pixels")[0]
    folder = results / "table1" / "runs" / row["run"]
    folder.mkdir(parents=True)
    (folder / "queued.json").write_text(json.dumps({"job_id": "987654321_0", "log": "x"}))
    rc, out = run(capsys, TABLE, "--status", "--only", "pixels", "--results", str(results))
    assert rc == 0 and calls.read_text().count("called") == 1, out
