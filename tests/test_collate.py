"""Tests for harness.collate on hand-made run.json files with known numbers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from harness.collate import collate, leaderboard, load_runs, main
from harness.reference import COLUMNS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(
    table_dir: Path,
    run_id: str,
    method: str,
    seed: int,
    status: str = "done",
    metrics: dict | None = None,
    swept: dict | None = None,
    error: str | None = None,
) -> None:
    """Writes one run.json the way the job runner does."""
    folder = table_dir / "runs" / run_id
    folder.mkdir(parents=True)
    run = {
        "run_id": run_id,
        "pretrain_id": f"p{run_id}",
        "table": "table1",
        "method": method,
        "seed": seed,
        "swept": swept or {},
        "status": status,
        "metrics": metrics or {},
        "protocols": {},
        "timings": {"pretrain_s": 60.0 + seed, "eval_s": 10.0},
        "artefacts": {},
        "git": "abc1234",
        "error": error,
        "log": f"/logs/{run_id}/log.txt",
        "started": "2026-11-23T14:00:00+00:00",
        "finished": None,
    }
    (folder / "run.json").write_text(json.dumps(run))


def metrics(linear: float, knn: float) -> dict[str, float]:
    """Returns a metrics dict with a linear and a kNN top-1."""
    return {"linear/top1": linear, "knn/top1@200": knn}


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """A table: simclr and byol × two seeds, one failed, one corrupt, one empty folder."""
    table_dir = tmp_path / "table1"
    write_run(table_dir, "s0", "simclr", 0, metrics=metrics(80.0, 70.0))
    write_run(table_dir, "s1", "simclr", 1, metrics=metrics(82.0, 74.0))
    write_run(table_dir, "b0", "byol", 0, metrics=metrics(85.0, 75.0))
    write_run(table_dir, "b1", "byol", 1, metrics=metrics(87.0, 75.0))
    write_run(
        table_dir,
        "m0",
        "moco",
        0,
        status="failed",
        metrics={"linear/top1": 1.0},
        error="ValueError: loss is NaN at step 12",
    )
    write_run(table_dir, "r0", "moco", 1, status="running")
    (table_dir / "runs" / "corrupt").mkdir()
    (table_dir / "runs" / "corrupt" / "run.json").write_text('{"run_id": "c0", "met')
    (table_dir / "runs" / "empty").mkdir()
    return table_dir


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    """A reference folder with a published SimCLR linear top-1 (reference/published.csv's schema)."""
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    row = ["simclr", "imagenet", "resnet50", "1000", "", "linear/mocov2", "linear/mocov2/top1", "69.3", "",
           "Chen et al. 2020, Table 6", "", ""]  # fmt: skip
    pd.DataFrame([row], columns=COLUMNS).to_csv(ref_dir / "simclr.csv", index=False)
    return ref_dir


def test_load_runs_skips_unreadable_folders(table: Path) -> None:
    with pytest.warns(UserWarning) as caught:
        df = load_runs(table)
    assert len(caught) == 2
    assert df.attrs["skipped"] == 2
    assert len(df) == 4 * 2 + 2  # two metrics per done run, one row per failed/running run
    failed = df[df["run_id"] == "m0"]
    assert len(failed) == 1 and failed["metric"].isna().all() and failed["value"].isna().all()


def test_leaderboard_means_stds_and_order(table: Path, reference: Path) -> None:
    with pytest.warns(UserWarning):
        board = collate(table, [reference])
    assert list(board["method"]) == ["byol", "simclr"]  # moco failed/running: no row
    simclr = board.set_index("method").loc["simclr"]
    assert simclr["linear/top1 mean"] == pytest.approx(81.0)
    assert simclr["linear/top1 std"] == pytest.approx(math.sqrt(2.0))
    assert simclr["knn/top1@200 mean"] == pytest.approx(72.0)
    assert simclr["knn/top1@200 std"] == pytest.approx(math.sqrt(8.0))
    assert simclr["seeds"] == 2 and simclr["linear/top1 n"] == 2
    assert simclr["cost_s"] == pytest.approx(70.5)  # (60 + 10 + 61 + 10) / 2
    # no conditions recorded: the nearest published number, labelled with its conditions, never a Δ
    assert simclr["published linear top-1: imagenet, resnet50"] == pytest.approx(69.3)
    assert pd.isna(board.set_index("method").loc["byol", "published linear top-1: imagenet, resnet50"])
    assert not [c for c in board.columns if c.startswith(("Δ", "verdict"))]
    saved = pd.read_csv(table / "leaderboard.csv")
    assert {"method", "linear/top1 mean", "linear/top1 std", "seeds", "cost_s"} <= set(saved.columns)
    assert saved["linear/top1 mean"].tolist() == pytest.approx([86.0, 81.0])


def test_files_failed_section_and_reference(table: Path, reference: Path) -> None:
    with pytest.warns(UserWarning):
        collate(table, [reference])
    md = (table / "leaderboard.md").read_text(encoding="utf-8")
    board_part, failed_part = md.split("## Failed runs")
    assert "# table1 leaderboard" in md
    assert "81.0 ± 1.4" in board_part and "86.0 ± 1.4" in board_part
    assert "moco" not in board_part.split("## Published")[0]
    published = board_part.split("## Published numbers")[1]
    assert "69.3" in published and "Chen et al. 2020, Table 6" in published
    assert "imagenet, resnet50, 1000 ep, linear/mocov2 linear/mocov2/top1" in published
    assert "m0" in failed_part and "ValueError: loss is NaN at step 12" in failed_part
    assert "/logs/m0/log.txt" in failed_part
    # r0 says "running" but no live process holds its lock: interrupted, with "killed" as the reason
    assert re.search(r"\| r0 +\| interrupted +\| killed", failed_part)
    assert "2 run(s) still running or incomplete (2 without a readable run.json)" in failed_part
    failed = pd.read_csv(table / "failed.csv")
    assert failed["run_id"].tolist() == ["m0", "r0"] and failed["status"].tolist() == ["failed", "interrupted"]
    png = (table / "leaderboard.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    assert not list(table.glob("*.tmp")) and not list(table.glob(".*.tmp"))


def test_rerun_after_fix_removes_failed_csv(table: Path) -> None:
    with pytest.warns(UserWarning):
        collate(table)
    assert (table / "failed.csv").exists()
    for run_id in ("m0", "r0"):  # the failed run and the dead one (interrupted) are run again
        (table / "runs" / run_id / "run.json").unlink()
        (table / "runs" / run_id).rmdir()
    write_run(table, "m0", "moco", 0, metrics=metrics(90.0, 80.0))
    with pytest.warns(UserWarning):
        board = collate(table)
    assert not (table / "failed.csv").exists()
    assert "## Failed runs" not in (table / "leaderboard.md").read_text(encoding="utf-8")
    assert board["method"].iloc[0] == "moco" and board["linear/top1 std"].isna().iloc[0]


def test_swept_keys_split_rows(tmp_path: Path) -> None:
    table_dir = tmp_path / "table2"
    for i, (epochs, seed, top1) in enumerate([(10, 0, 70.0), (10, 1, 72.0), (20, 0, 80.0)]):
        write_run(
            table_dir, f"e{i}", "simclr", seed, metrics={"linear/top1": top1}, swept={"trainer.Trainer.epochs": epochs}
        )
    board = leaderboard(load_runs(table_dir))
    assert board["swept:trainer.Trainer.epochs"].tolist() == [20, 10]
    assert board["linear/top1 mean"].tolist() == pytest.approx([80.0, 71.0])
    assert board["seeds"].tolist() == [1, 2]


def test_no_done_runs_still_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table_dir = tmp_path / "table3"
    write_run(table_dir, "f0", "simclr", 0, status="failed", error="RuntimeError: out | of memory")
    main([str(table_dir)])
    out = capsys.readouterr().out
    assert "No finished runs yet" in out and r"RuntimeError: out \| of memory" in out
    for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.png", "failed.csv"):
        assert (table_dir / name).stat().st_size > 0


def test_skipped_method_is_listed_with_its_reason_not_as_pending(tmp_path: Path) -> None:
    reason = "colorization needs colour (3-channel) images; this dataset has 1 channel"
    table = tmp_path / "table1"
    write_run(table, "s0", "simclr", 0, metrics=metrics(80.0, 70.0))
    write_run(table, "b0", "byol", 0, metrics=metrics(85.0, 75.0))
    for seed in (0, 1):
        write_run(table, f"col{seed}", "colorization", seed, status="skipped", error=reason)
    board = collate(table)
    row = board[board["method"] == "colorization"].iloc[0]
    assert row["seeds"] == 0 and row["note"] == f"skipped: {reason}" and math.isnan(row["linear/top1 mean"])
    assert board["method"].iloc[-1] == "colorization"  # after every method with numbers
    assert (board[board["method"] != "colorization"]["note"] == "").all()
    md = (table / "leaderboard.md").read_text()
    assert f"skipped: {reason}" in md and "incomplete" not in md and not (table / "failed.csv").exists()


def test_runs_outside_the_tables_plan_stay_out_of_the_means(tmp_path: Path) -> None:
    """Runs left by older settings of a table (another run id) are not averaged in."""
    table = tmp_path / "table1"
    write_run(table, "new0", "simclr", 0, metrics=metrics(80.0, 70.0))
    write_run(table, "new1", "simclr", 1, metrics=metrics(82.0, 72.0))
    write_run(table, "old0", "simclr", 0, metrics=metrics(50.0, 40.0))
    assert collate(table).loc[0, "seeds"] == 3  # no plan: every run folder counts
    (table / "plan.json").write_text(json.dumps({"run_ids": ["new0", "new1"]}))
    board = collate(table)
    assert board.loc[0, "seeds"] == 2 and board.loc[0, "linear/top1 mean"] == 81.0
    assert "1 run(s) in runs/ belong to other settings" in (table / "leaderboard.md").read_text()


def test_a_runs_warning_is_shown_beside_its_numbers(tmp_path: Path) -> None:
    table_dir = tmp_path / "table1"
    write_run(table_dir, "s0", "simclr", 0, metrics=metrics(100.0, 100.0))
    rec = json.loads((table_dir / "runs" / "s0" / "run.json").read_text())
    rec["warnings"] = ["the train split has 1 class ('a'): every classification accuracy is trivially 100 %"]
    (table_dir / "runs" / "s0" / "run.json").write_text(json.dumps(rec))
    write_run(table_dir, "b0", "byol", 0, metrics=metrics(80.0, 70.0))
    board = collate(table_dir).set_index("method")
    assert board.loc["simclr", "note"].startswith("warning: the train split has 1 class")
    assert board.loc["byol", "note"] == ""
    assert "trivially 100 %" in (table_dir / "leaderboard.md").read_text(encoding="utf-8")
