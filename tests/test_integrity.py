"""No silent wrong numbers: stored results are checked before they are trusted, bad input
stops the sweep with the file, the key and the fix (exit 2, nothing written), and a run
whose process died is shown as interrupted. Real files on disk, the real CLI."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import collate, store, sweep
from tests.conftest import REPO
from tests.test_data import write_fake_fmnist

TABLE = "gin/table1.gin"


def run(capsys, *args: str) -> tuple[int, str]:
    rc = sweep.main(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.fixture
def table(tmp_path):
    """Arguments for one small in-process run of `supervised` on generated Fashion-MNIST files."""
    write_fake_fmnist(tmp_path / "data", n_train=300, n_test=100)
    return [
        TABLE,
        "gin/scale/smoke.gin",
        "gin/launch/inprocess.gin",
        "--only",
        "supervised",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "job.run.evaluations = [@linear.LinearProbe()]",
        "--bind",
        f"data.FashionMNIST.root = '{tmp_path / 'data'}'",
        "--bind",
        "data.FashionMNIST.download = False",
        "--results",
        str(tmp_path / "results"),
    ]


def _record(tmp_path) -> tuple[Path, dict]:
    (path,) = (tmp_path / "results" / "table1" / "runs").glob("*/run.json")
    return path, json.loads(path.read_text())


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _state(capsys, table) -> str:
    rc, out = run(capsys, *table, "--status")
    assert rc == 0, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("supervised")]
    return line.split()[4]


def test_a_deleted_encoder_is_rebuilt_never_replaced_by_a_fresh_network(capsys, tmp_path, table):
    rc, out = run(capsys, *table)
    assert rc == 0, out
    path, rec = _record(tmp_path)
    pre = tmp_path / "results" / "pretrain" / rec["pretrain_id"]
    assert f"pretrain/{rec['pretrain_id']}/encoder.pt" in rec["artefacts"]
    assert any("/features/" in k for k in rec["artefacts"])
    encoder = _weights(pre / "encoder.pt")

    (pre / "encoder.pt").unlink()
    assert _state(capsys, table) == "invalid"  # no longer "done"
    rc, out = run(capsys, *table)
    assert rc == 0, out
    assert "encoder.pt: missing" in out and "rebuilding it" in out
    assert _same(_weights(pre / "encoder.pt"), encoder)  # exported again from the final checkpoint
    assert _record(tmp_path)[1]["metrics"] == rec["metrics"]

    # The case: encoder, run.json and features all gone. Still the trained encoder.
    (pre / "encoder.pt").unlink()
    path.unlink()
    for f in (pre / "features").iterdir():
        f.unlink()
    rc, out = run(capsys, *table)
    assert rc == 0, out
    assert _same(_weights(pre / "encoder.pt"), encoder) and _record(tmp_path)[1]["metrics"] == rec["metrics"]


def test_a_damaged_encoder_or_feature_cache_is_rebuilt(capsys, tmp_path, table):
    assert run(capsys, *table)[0] == 0
    path, rec = _record(tmp_path)
    pre = tmp_path / "results" / "pretrain" / rec["pretrain_id"]
    encoder = _weights(pre / "encoder.pt")
    damaged = bytearray((pre / "encoder.pt").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size: only the checksum can tell
    (pre / "encoder.pt").write_bytes(bytes(damaged))
    (feature,) = [p for p in (pre / "features").glob("*.pt")][:1]
    feature.write_bytes(feature.read_bytes()[:-10])  # truncated
    path.unlink()
    rc, out = run(capsys, *table)
    assert rc == 0, out
    assert "SHA-256 differs" in out and _same(_weights(pre / "encoder.pt"), encoder)
    assert _record(tmp_path)[1]["metrics"] == rec["metrics"]


def test_an_incomplete_run_record_is_never_done_and_a_rerun_repairs_it(capsys, tmp_path, table):
    assert run(capsys, *table)[0] == 0
    path, rec = _record(tmp_path)
    path.write_text('{"status": "done"}')
    assert _state(capsys, table) == "invalid"
    board = collate.collate(tmp_path / "results" / "table1")
    assert board.empty or "supervised" not in set(board["method"])  # not averaged
    rc, out = run(capsys, *table)
    assert rc == 0 and "1 to run" in out
    assert _record(tmp_path)[1]["metrics"] == rec["metrics"] and _state(capsys, table) == "done"


def test_an_unreadable_checkpoint_fails_with_its_path_and_the_fix(capsys, tmp_path, table):
    args = [*table, "--bind", "trainer.Trainer.max_steps = 4"]
    assert run(capsys, *args)[0] == 0
    path, rec = _record(tmp_path)
    pre = tmp_path / "results" / "pretrain" / rec["pretrain_id"]
    ckpt = pre / "checkpoint.pt"
    for f in (pre / "pretrain.json", pre / "encoder.pt", path):
        f.unlink()
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    rc, out = run(capsys, *args)
    assert rc == 1
    _, failed = _record(tmp_path)
    msg = f"{ckpt}: unreadable, truncated or damaged"
    assert failed["status"] == "failed" and msg in failed["error"] and f"Fix: delete {ckpt}" in failed["error"]
    assert run(capsys, *args)[0] == 1 and msg in _record(tmp_path)[1]["error"]  # the same on a re-run

    torch.save({"step": 2, "payload": argparse.Namespace(x=1)}, ckpt)  # a pickle beyond tensors
    rc, out = run(capsys, *args)
    error = _record(tmp_path)[1]["error"]
    assert rc == 1 and f"{ckpt}: holds pickled objects" in error and "weights_only" not in error


def test_a_batch_larger_than_the_data_stops_the_sweep_before_any_job(capsys, tmp_path, table):
    args = [*table, "--bind", "trainer.Trainer.batch_size = 512"]  # smoke: 256 pretraining images, max_steps set
    rc, out = run(capsys, *args)
    assert rc == 2 and "trainer.Trainer.batch_size = 512 exceeds the 256 pretraining images" in out
    assert "Traceback" not in out and not (tmp_path / "results").exists()
    assert run(capsys, *args) == (rc, out)


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--bind", "table.Table.seeds = []"), "table.Table.seeds = []: a table needs at least one seed"),
        (("--only", ""), "--only names no method"),
        (("--only", " , "), "--only names no method"),
        (
            ("--bind", "table.Table.sweep = {'byol.BYOL.base_momentum': [0.9, 0.99]}"),
            "'byol.BYOL.base_momentum' changes no run of table table1",
        ),
    ],
)
def test_an_empty_table_or_an_unread_sweep_is_an_error(capsys, tmp_path, args, expected):
    rc, out = run(capsys, TABLE, "--results", str(tmp_path), *args)
    assert rc == 2 and expected in out and "Fix:" in out
    assert not any(tmp_path.iterdir())


def test_a_sweep_key_some_methods_ignore_is_reported(capsys):
    rc, out = run(
        capsys,
        TABLE,
        "--dry-run",
        "--only",
        "simclr,rotnet",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "table.Table.sweep = {'simclr.SimCLR.temperature': [0.1, 0.5]}",
    )
    assert rc == 0, out
    assert "'simclr.SimCLR.temperature' does not change the runs of rotnet: one run each instead of 2" in out
    assert len([ln for ln in out.splitlines() if ln.startswith(("simclr", "rotnet"))]) == 3


def test_collate_on_a_missing_folder(tmp_path, capsys):
    assert collate.main([str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such table folder" in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, "-m", "harness.collate", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "nope").exists()


def test_the_nan_message_quotes_the_bound_base_lr(capsys, tmp_path, table):
    rc, out = run(capsys, *table, "--bind", "trainer.Trainer.base_lr = 1e30", "--bind", "optim.SGD.momentum = 0.0")
    assert rc == 1
    error = _record(tmp_path)[1]["error"]
    assert "NonFiniteLoss" in error and "trainer.Trainer.base_lr = 1e+30 x batch_size 64 / 256" in error


# --- lifecycle ----------------------------------------------------------------------------------

_HOLD = (
    "import sys, time; from pathlib import Path; from harness import store\n"
    "with store.owned(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n"
)


def test_a_running_record_whose_process_died_is_interrupted(tmp_path, capsys):
    folder = tmp_path / "t" / "runs" / "abc"
    folder.mkdir(parents=True)
    rec = {
        "run_id": "abc",
        "pretrain_id": "p",
        "table": "t",
        "method": "m",
        "seed": 0,
        "status": "running",
        "metrics": {},
        "protocols": {},
        "timings": {},
        "artefacts": {},
        "error": None,
    }
    store.write_json(folder / "run.json", rec)
    owner = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        assert store.effective_status(folder) == ("running", "")
        assert "1 running" in (
            collate.collate(tmp_path / "t") is not None and (tmp_path / "t" / "leaderboard.md").read_text()
        )
        with pytest.raises(store.Busy):  # a second process for the same run
            with store.owned(folder, wait_s=0.3):
                pass
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    status, reason = store.effective_status(folder)
    assert status == "interrupted" and reason.startswith("killed")
    collate.collate(tmp_path / "t")
    md = (tmp_path / "t" / "leaderboard.md").read_text()
    assert "running" not in md and "interrupted" in md and "killed" in md


def test_a_second_process_never_runs_a_run_that_is_being_run(capsys, tmp_path, table):
    rc, out = run(capsys, *table, "--dry-run")
    run_id = re.search(r"supervised\s+0\s+([0-9a-f]{12})", out).group(1)
    folder = tmp_path / "results" / "table1" / "runs" / run_id
    folder.mkdir(parents=True)
    owner = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        rc, out = run(capsys, *table)
        assert rc == 0 and "is being run by another process" in out
        assert not (folder / "run.json").exists()
    finally:
        owner.kill()
        owner.wait()
    assert run(capsys, *table)[0] == 0 and _record(tmp_path)[1]["status"] == "done"


def test_temp_files_of_killed_writers_are_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = store._HOST  # noqa: SLF001 - the name a writer on this host gives its temp files
    stale = tmp_path / f".checkpoint.pt.{dead.pid}@{host}.k2j4x8a1.tmp"
    live = tmp_path / f".encoder.pt.{os.getpid()}@{host}.abcd1234.tmp"
    elsewhere = tmp_path / f".encoder.pt.{dead.pid}@another_host.abcd1234.tmp"
    for f in (stale, live, elsewhere):
        f.write_bytes(b"partial")
    assert store.clean_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and elsewhere.exists()
    with store.atomic_path(tmp_path / "x.json") as tmp:  # the writer's own name has the same shape
        assert re.match(rf"^\.x\.json\.{os.getpid()}@{re.escape(host)}\.[^.]+\.tmp$", tmp.name)


@pytest.mark.slow
def test_sigterm_to_the_sweep_stops_its_job_and_records_it_interrupted(tmp_path):
    write_fake_fmnist(tmp_path / "data", n_train=300, n_test=100)
    cmd = [
        sys.executable,
        "-m",
        "harness.sweep",
        TABLE,
        "gin/scale/smoke.gin",
        "--only",
        "supervised",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "trainer.Trainer.max_steps = 100000",
        "--bind",
        f"data.FashionMNIST.root = '{tmp_path / 'data'}'",
        "--bind",
        "data.FashionMNIST.download = False",
        "--results",
        str(tmp_path / "results"),
    ]
    # As from `cmd &` in a script: the sweep and its jobs inherit SIGINT ignored, so a job stops
    # only because the harness restores SIGINT's handler (or, failing that, kills it).
    sweep_proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    log = tmp_path / "results" / "pretrain"
    deadline = time.monotonic() + 300
    while not list(log.glob("*/log.jsonl")) and time.monotonic() < deadline:  # training has started
        time.sleep(0.5)
    (path,) = (tmp_path / "results" / "table1" / "runs").glob("*/run.json")
    pid = json.loads(path.read_text())["pid"]
    sweep_proc.send_signal(signal.SIGTERM)
    _, err = sweep_proc.communicate(timeout=120)
    assert sweep_proc.returncode == 130, err[-2000:]
    assert "recorded as interrupted" in err
    rec = json.loads(path.read_text())
    assert rec["status"] == "interrupted" and "interrupted" in rec["error"]
    time.sleep(1)
    assert not store.pid_alive(pid)  # the job did not outlive its sweep


@pytest.mark.slow
def test_a_job_killed_by_sigkill_is_recorded_interrupted_not_running(tmp_path):
    write_fake_fmnist(tmp_path / "data", n_train=300, n_test=100)
    cmd = [
        sys.executable,
        "-m",
        "harness.sweep",
        TABLE,
        "gin/scale/smoke.gin",
        "--only",
        "supervised",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "trainer.Trainer.max_steps = 100000",
        "--bind",
        f"data.FashionMNIST.root = '{tmp_path / 'data'}'",
        "--bind",
        "data.FashionMNIST.download = False",
        "--results",
        str(tmp_path / "results"),
    ]
    sweep_proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "results" / "pretrain").glob("*/log.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # a few progress-bar updates in the job's output
    (path,) = (tmp_path / "results" / "table1" / "runs").glob("*/run.json")
    os.kill(json.loads(path.read_text())["pid"], signal.SIGKILL)
    out, err = sweep_proc.communicate(timeout=120)
    assert sweep_proc.returncode == 1, err[-2000:]
    rec = json.loads(path.read_text())
    assert rec["status"] == "interrupted" and rec["error"].startswith("killed"), rec["error"]
    md = (tmp_path / "results" / "table1" / "leaderboard.md").read_text()
    assert "interrupted" in md and "still running" not in md and "it/s" not in md


def test_a_single_class_dataset_is_warned_about(capsys, tmp_path):
    from tests.test_imagefolder import write_tree

    write_tree(tmp_path / "data", classes=("cat",), per_class=40)
    rc, out = run(
        capsys,
        TABLE,
        "gin/scale/smoke.gin",
        "gin/launch/inprocess.gin",
        "--only",
        "random",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "job.run.evaluations = [@knn.KNN()]",
        "--bind",
        "job.run.dataset = @data.ImageFolder()",
        "--bind",
        f"data.ImageFolder.root = '{tmp_path / 'data'}'",
        "--bind",
        "data.ImageFolder.load_size = 32",
        "--bind",
        "data.ImageFolder.pretrain_size = None",
        "--bind",
        "trainer.Trainer.batch_size = 16",
        "--results",
        str(tmp_path / "results"),
    )
    assert rc == 0, out
    rec = _record(tmp_path)[1]
    assert rec["metrics"]["knn/top1@20"] == 100.0
    assert rec["warnings"] and "1 class" in rec["warnings"][0] and "warning: the train split has 1 class" in out
    assert "trivially 100 %" in (tmp_path / "results" / "table1" / "leaderboard.md").read_text()
