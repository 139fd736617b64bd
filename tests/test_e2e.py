"""End to end on the real Fashion-MNIST files: the README's table at the smoke scale."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, fmnist_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not fmnist_available(),
        reason="Fashion-MNIST IDX files absent from "
        "/usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)",
    ),
]


def sweep(results: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "harness.sweep",
        "gin/table1.gin",
        "gin/scale/smoke.gin",
        "--results",
        str(results),
        "--bind",
        "data.FashionMNIST.download = False",
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_table1_smoke_end_to_end_then_nothing_to_do(tmp_path):
    # Two local jobs at a time (one torch thread each): the ten runs are mostly process start-up,
    # so this halves the test's wall time on CI's two cores; README's command runs them one by one.
    first = sweep(tmp_path, "--bind", "launch.Local.parallel = 2")
    assert first.returncode == 0, first.stderr[-3000:]
    table = tmp_path / "table1"
    board = pd.read_csv(table / "leaderboard.csv")
    assert sorted(board["method"]) == ["pixels", "random", "rotnet", "simclr", "supervised"]
    assert (board["seeds"] == 2).all()
    for col in ("linear/top1 mean", "knn/top1@20 mean", "knn/top1@200 mean"):
        assert board[col].between(0, 100).all(), col
    assert (board["linear/top1 mean"] > 15).all()  # 10 classes: every method beats chance on the probe
    assert (table / "leaderboard.md").read_text().count("|") > 20
    assert (table / "leaderboard.png").stat().st_size > 1000
    assert len(list(table.glob("runs/*/config.gin"))) == 10
    timings = [json.loads(p.read_text())["timings"] for p in table.glob("runs/*/run.json")]
    trained = [t for t in timings if t["pretrain_s"] > 1]  # the methods that pretrain, in this job
    assert trained and all(0 < t["pretrain_cpu_s"] and 0 < t["eval_cpu_s"] for t in trained)
    exported = list((tmp_path / "pretrain").glob("*/encoder.pt"))
    assert len(exported) == 8  # every method but pixels exports its encoder

    again = sweep(tmp_path)
    assert again.returncode == 0 and "10 already done, 0 queued or running, 0 to run" in again.stderr
    assert "pretrain:" not in again.stderr


# The method-family tables; the protocol tables (fine-tuning, detection) are smoke-run by
# tests/test_protocols.py on a few methods each.
FAMILY_TABLES = sorted(
    p.stem
    for p in (REPO / "gin").glob("table_*.gin")
    if p.stem not in {"table_common", "table_finetune", "table_detection"}
)


# CLIP's table (the only CLI run of zero-shot) runs by default; the other family tables (a
# minute each at smoke scale, ~4 min together) are exhaustive checks: `pytest --full`.
@pytest.mark.parametrize(
    "table", [t if t == "table_clip" else pytest.param(t, marks=pytest.mark.full) for t in FAMILY_TABLES]
)
def test_every_method_of_a_family_table_trains_through_the_cli_at_smoke_scale(table, tmp_path):
    """Each method of the table, one seed, in the sweep's process (gin/launch/inprocess.gin):
    pretraining, export, both protocols, collation. A method that refuses the data (colour-only
    on Fashion-MNIST) must say why instead."""
    cmd = [
        sys.executable,
        "-m",
        "harness.sweep",
        f"gin/{table}.gin",
        "gin/scale/smoke.gin",
        "gin/launch/inprocess.gin",
        "--results",
        str(tmp_path),
        "--bind",
        "data.FashionMNIST.download = False",
        "--bind",
        "table.Table.seeds = [0]",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    board = pd.read_csv(tmp_path / table / "leaderboard.csv", keep_default_na=False)
    listed = subprocess.run(
        [sys.executable, "-m", "harness.sweep", f"gin/{table}.gin", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    runs = listed.split("\nprotocol budgets")[0]  # the run list, without the budgets printed below it
    methods = {line.split()[0] for line in runs.splitlines()[2:] if line.strip()}
    assert set(board["method"]) == methods
    for _, row in board.iterrows():
        if row["note"]:
            assert row["note"].startswith("skipped: ") and "colour" in row["note"], row.to_dict()
            continue
        assert row["seeds"] == 1, row.to_dict()
        for col in ("linear/top1 mean", "knn/top1@20 mean"):
            assert 0 <= float(row[col]) <= 100, (row["method"], col, row[col])
