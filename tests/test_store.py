"""The store under concurrency: many writers into one table lose and tear nothing."""

import json
import multiprocessing as mp
from pathlib import Path

from harness import collate, store


def _writer(root: str, i: int) -> None:
    folder = store.run_dir(root, "t", f"run{i:02d}")
    for attempt in range(30):  # rewrite often, so readers race with renames
        rec = {
            "run_id": f"run{i:02d}",
            "pretrain_id": "p",
            "table": "t",
            "method": f"m{i % 4}",
            "seed": i,
            "status": "done" if attempt == 29 else "running",
            "metrics": {"linear/top1": float(i)},
            "protocols": {},
            "timings": {"pretrain_s": 1.0, "eval_s": 1.0},
            "artefacts": {},
            "padding": "x" * 20000,
        }
        store.write_json(folder / "run.json", rec)


def test_twenty_concurrent_writers_lose_and_tear_nothing(tmp_path):
    ctx = mp.get_context("fork")  # separate processes without re-importing torch and pandas in each (spawn: ~3 min)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), i)) for i in range(20)]
    for p in procs:
        p.start()
    torn = 0
    while any(p.is_alive() for p in procs):  # read while they write: every file parses, always
        for f in Path(tmp_path).rglob("run.json"):
            try:
                json.loads(f.read_text())
            except ValueError:
                torn += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert torn == 0
    assert not list(Path(tmp_path).rglob("*.tmp"))
    df = collate.load_runs(tmp_path / "t")
    assert sorted(df["run_id"].unique()) == [f"run{i:02d}" for i in range(20)]
    assert (df["status"] == "done").all()


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "x.json"
    try:
        with store.atomic_path(target) as tmp:
            tmp.write_text("{partial")
            raise RuntimeError("killed mid-write")
    except RuntimeError:
        pass
    assert not target.exists() and not list(tmp_path.iterdir())
