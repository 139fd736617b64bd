"""The sweep on a real single-node SLURM cluster: job arrays, status, idempotent
re-submission, and preemption with requeue and resume."""

import json
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO
from tests.test_data import write_fake_fmnist

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture
def base(tmp_path):
    write_fake_fmnist(tmp_path / "data", n_train=300, n_test=100)
    return [
        "gin/table1.gin",
        "gin/scale/smoke.gin",
        "gin/launch/slurm.gin",
        "--bind",
        f"data.FashionMNIST.root = '{tmp_path / 'data'}'",
        "--bind",
        "data.FashionMNIST.download = False",
        "--bind",
        "backbone.create.name = 'test_resnet'",
        "--bind",
        "launch.Slurm.gpus_per_node = 0",
        "--bind",
        "launch.Slurm.cpus_per_task = 1",
        "--bind",
        "launch.Slurm.mem_gb = 2",
        "--bind",
        "launch.Slurm.time_min = 20",
        "--bind",
        "launch.Slurm.poll_s = 1.0",
        "--results",
        str(tmp_path / "results"),
    ]


def sweep(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness.sweep", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def runs(tmp_path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (tmp_path / "results" / "table1" / "runs").glob("*/run.json")]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_table_runs_as_a_job_array_and_resubmitting_runs_nothing(slurm_cluster, tmp_path, base):
    args = [*base, "--only", "random,pixels", "--bind", "table.Table.seeds = [0]", "--bind", "launch.Slurm.wait = True"]
    first = sweep(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "submitted 2 runs as SLURM job array" in first.stderr
    done = runs(tmp_path)
    assert len(done) == 2 and all(r["status"] == "done" for r in done)
    markers = [json.loads(p.read_text()) for p in (tmp_path / "results" / "table1" / "runs").glob("*/queued.json")]
    assert len({m["job_id"].split("_")[0] for m in markers}) == 1  # one array
    status = sweep(*args, "--status")
    assert status.returncode == 0 and status.stdout.count(" done ") == 2
    again = sweep(*args)
    assert again.returncode == 0 and "0 to run" in again.stderr and "submitted" not in again.stderr


def test_queued_runs_are_not_submitted_twice_and_status_shows_them(slurm_cluster, tmp_path, base):
    # --begin keeps the job pending for 40 s, so the second call (~10 s of planning) finds it
    # queued however slowly this machine plans (under load, a job of 60 steps finished first).
    args = [
        *base,
        "--only",
        "supervised",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "launch.Slurm.additional = {'begin': 'now+40'}",
    ]
    first = sweep(*args)
    assert first.returncode == 0 and "submitted 1 runs" in first.stderr, first.stderr[-3000:]
    second = sweep(*args)
    assert "1 queued or running, 0 to run" in second.stderr and "submitted" not in second.stderr
    status = sweep(*args, "--status")
    assert re_state(status.stdout) in {"pending", "running", "configuring", "completing", "done"}
    (marker,) = (tmp_path / "results" / "table1" / "runs").glob("*/queued.json")
    subprocess.run(["scancel", json.loads(marker.read_text())["job_id"]], check=True)  # the run itself is not the point


def re_state(text: str) -> str:
    line = next(ln for ln in text.splitlines() if ln.startswith("supervised"))
    return line.split()[4]


def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(slurm_cluster, tmp_path, base):
    steps = [
        "--only",
        "supervised",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "trainer.Trainer.max_steps = 150",
        "--bind",
        "trainer.Trainer.checkpoint_every = 1000",
        "--bind",
        "launch.Slurm.cpus_per_task = 2",
        "--bind",
        "backbone.create.name = 'resnet18'",
    ]
    reference = sweep(
        *[a if not a.endswith("slurm.gin") else "gin/launch/local.gin" for a in base[:-1]],
        str(tmp_path / "reference"),
        *steps,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    (ref_run,) = [json.loads(p.read_text()) for p in (tmp_path / "reference" / "table1" / "runs").glob("*/run.json")]

    first = sweep(*base, *steps)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = next((tmp_path / "results" / "table1" / "runs").glob("*"))
    job_id = json.loads((run_dir / "queued.json").read_text())["job_id"]
    log = tmp_path / "results" / "pretrain" / ref_run["pretrain_id"] / "log.jsonl"

    def steps_logged() -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    wait_until(lambda: steps_logged() >= 8, 240, "pretraining to get going")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what SLURM sends on preemption
    wait_until(lambda: any(r["status"] == "done" for r in runs(tmp_path)), 400, "the requeued run to finish")

    (run,) = runs(tmp_path)
    job_log = open(json.loads((run_dir / "queued.json").read_text())["log"]).read()
    assert "preempted after step" in job_log and "resuming from step" in job_log
    assert run["pretrain_id"] == ref_run["pretrain_id"] and run["metrics"] == ref_run["metrics"]
    ours = torch.load(log.parent / "encoder.pt", weights_only=True)
    theirs = torch.load(tmp_path / "reference" / "pretrain" / ref_run["pretrain_id"] / "encoder.pt", weights_only=True)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == list(range(150))


def test_slurm_launcher_without_sbatch_says_what_to_use(tmp_path, base, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    proc = subprocess.run(
        [sys.executable, "-m", "harness.sweep", *base, "--only", "pixels"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "sbatch not found" in proc.stderr and "gin/launch/local.gin" in proc.stderr
    assert not list((tmp_path / "results").rglob("run.json"))


def test_two_tasks_of_one_job_train_data_parallel(slurm_cluster, tmp_path, base):
    """tasks_per_node = 2: submitit starts two processes that join one gloo group; the loss
    trajectory matches a one-process local run of the same table (see tests/test_ddp.py)."""
    args = [
        "--only",
        "supervised",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "trainer.Trainer.max_steps = 6",
        "--bind",
        "backbone.create.name = 'test_vit'",
    ]
    local = sweep(
        *[a if not a.endswith("slurm.gin") else "gin/launch/local.gin" for a in base[:-1]],
        str(tmp_path / "local"),
        *args,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    ddp = sweep(*base, *args, "--bind", "launch.Slurm.tasks_per_node = 2", "--bind", "launch.Slurm.wait = True")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (rec,) = runs(tmp_path)
    rank1 = list((tmp_path / "results" / "table1" / "jobs").glob("*_1_log.out"))
    assert rank1, "no log of a second task: the job did not run data parallel"

    def losses(root) -> list[float]:
        log = root / "pretrain" / rec["pretrain_id"] / "log.jsonl"
        return [json.loads(ln)["loss"] for ln in log.read_text().splitlines()]

    one, two = losses(tmp_path / "local"), losses(tmp_path / "results")
    assert len(one) == len(two) == 6
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(one, two)), (one, two)


def test_a_submission_sbatch_refuses_is_an_error_that_leaves_nothing(slurm_cluster, tmp_path, base):
    args = [
        *base,
        "--only",
        "pixels",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "launch.Slurm.partition = 'no-such-partition'",
    ]
    proc = sweep(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "sbatch refused the job array" in proc.stderr and "partition" in proc.stderr
    assert "Fix:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists()  # no leftover .pkl / .sh, markers or plan
    assert sweep(*args).stderr.splitlines()[-1] == proc.stderr.splitlines()[-1]  # the same on a re-run
