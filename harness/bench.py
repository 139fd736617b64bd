"""Benchmarks: speed targets live here, not in timed tests.

    python -m harness.bench throughput            # backbone candidates, img/s
    python -m harness.bench methods [TABLE.gin] [NAMES]  # s/step of each method of a table
    python -m harness.bench table gin/table1.gin  # wall time of a whole table (fresh results)
    python -m harness.bench runs results/table1   # timings the runs of a table recorded
    python -m harness.bench decode                # img/s per core of each JPEG decode path
    python -m harness.bench pipeline              # a step fed by data.Pipeline vs an in-memory batch
    python -m harness.bench shards                # images each of 2 gloo ranks decodes per step
    python -m harness.bench finetune              # the evaluations' fine-tuning on files: decode ahead vs in line

Each writes ``benchmarks/<command>.json`` (machine, versions, numbers) and prints
a markdown table; BENCHMARKS.md quotes them.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from harness import backbone, ginutil, store

OUT = ginutil.REPO_ROOT / "benchmarks"
CANDIDATES = [
    ("resnet18", 32, False),
    ("resnet18", 28, False),
    ("resnet10t", 32, False),
    ("resnet34", 32, False),
    ("resnet18", 64, False),
    ("resnet18", 32, True),
]


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "git": store.git_revision(),
        "date": store.now(),
    }


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def throughput(batch: int = 256, repeats: int = 3) -> list[dict]:
    """Training (forward, backward, SGD step) and inference img/s of backbone candidates, 1 channel."""
    rows = []
    for name, size, small in CANDIDATES:
        net = backbone.create(name, in_chans=1, small_input=small)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        x = torch.randn(batch if not small else batch // 4, 1, size, size)

        def train_step():
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()

        def infer():
            with torch.no_grad():
                net.eval()(x)
            net.train()

        rows.append(
            {
                "backbone": name,
                "size": size,
                "small_input": small,
                "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
                "train_img_s": round(len(x) / _timed(train_step, repeats)),
                "infer_img_s": round(len(x) / _timed(infer, repeats)),
            }
        )
        print(rows[-1], flush=True)
    return rows


def methods(names: Sequence[str], table_files: Sequence[str] = ("gin/table1.gin",), steps: int = 4) -> list[dict]:
    """Seconds per training step of each method as a table runs it (the method's gin file, then
    the table's: scale, data, its own views and batch); a method that refuses the data is listed
    with its reason. Default names: the table's methods."""
    from harness import job
    from harness.trainer import Trainer, batch_indices
    from methods.base import Batch, Unsupported

    ginutil.parse(list(table_files))
    table = ginutil.reference("table.Table")()
    names = names or table.methods
    rows = []
    for name in names:
        ginutil.parse(ginutil.run_files(name, table.scale, table_files))
        dataset = ginutil.reference("job.run.dataset")
        data = dataset.split("pretrain")
        try:
            method, views = job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, 0)
        except Unsupported as err:
            rows.append({"method": name, "skipped": str(err).splitlines()[0]})
            print(rows[-1], flush=True)
            continue
        trainer = Trainer()
        if trainer.total_steps(method, len(data)) == 0:
            continue
        method.train()
        trainable = [p for p in method.parameters() if p.requires_grad] or [torch.nn.Parameter(torch.zeros(1))]
        opt = torch.optim.SGD(trainable, lr=1e-3)
        state = {"step": 0}

        def step():
            idx = batch_indices(len(data), trainer.batch_size, 0, state["step"])
            state["step"] += 1
            loss = method.loss(Batch(views(data.images[idx]), data.labels[idx], idx))["loss"]
            if loss.requires_grad:
                opt.zero_grad()
                loss.backward()
                opt.step()
            method.after_step(state["step"] - 1, trainer.total_steps(method, len(data)))

        sec = _timed(step, steps)
        total = trainer.total_steps(method, len(data))
        rows.append(
            {
                "method": name,
                "batch": trainer.batch_size,
                "views": len(views.augmentations),
                "s_per_step": round(sec, 3),
                "steps": total,
                "est_pretrain_s": round(sec * total),
            }
        )
        print(rows[-1], flush=True)
    return rows


def table(gin_files: Sequence[str], bindings: Sequence[str] = ()) -> list[dict]:
    """Wall time of a whole table run from scratch through the CLI (with `bindings` as ``--bind``), and its
    leaderboard."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        binds = [a for b in bindings for a in ("--bind", b)]
        proc = subprocess.run(
            [sys.executable, "-m", "harness.sweep", *gin_files, *binds, "--results", tmp],
            cwd=ginutil.REPO_ROOT,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"table failed:\n{proc.stderr[-3000:]}")
        name = next(Path(tmp).glob("*/leaderboard.md")).parent
        board = (name / "leaderboard.md").read_text()
    print(board)
    return [
        {"table": " ".join(gin_files), "bindings": list(bindings), "wall_s": round(wall, 1), "leaderboard_md": board}
    ]


def runs(table_dirs: Sequence[str]) -> list[dict]:
    """Timings a table's finished runs recorded (run.json), mean per method: wall and CPU seconds
    of pretraining and evaluation, and each protocol's CPU seconds where recorded. CPU seconds barely move when
    other jobs share the cores;
    with one torch thread per job (``launch.Local.parallel = 2``) they are the run's wall time
    on an idle core."""
    from harness import collate

    rows = []
    for table_dir in table_dirs:
        df = collate.load_runs(Path(table_dir))
        done = df[df["status"] == store.Status.DONE.value].drop_duplicates("run_id")
        for method, group in done.groupby("method", sort=False):
            recs = [store.read_json(Path(table_dir) / "runs" / r / "run.json") or {} for r in group["run_id"]]
            t = [r.get("timings") or {} for r in recs]

            def mean(key: str) -> float | None:
                vals = [x[key] for x in t if isinstance(x.get(key), (int, float))]
                return round(sum(vals) / len(vals), 1) if vals else None

            names = dict.fromkeys(n for x in t for n in x.get("protocols") or {})  # run.json since 66273d7
            per_protocol = {
                n: round(
                    sum(x["protocols"][n]["cpu_s"] for x in t if n in x.get("protocols", {}))
                    / sum(n in x.get("protocols", {}) for x in t),
                    1,
                )
                for n in names
            }
            rows.append(
                {
                    "table": Path(table_dir).name,
                    "method": method,
                    "runs": len(recs),
                    **{k: mean(k) for k in ("pretrain_s", "pretrain_cpu_s", "eval_s", "eval_cpu_s")},
                    **({"protocol_cpu_s": per_protocol} if per_protocol else {}),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "what", choices=["throughput", "methods", "table", "runs", "decode", "pipeline", "shards", "finetune"]
    )
    ap.add_argument(
        "args",
        nargs="*",
        help="methods: a table's gin files and/or method names (default: the "
        "methods of gin/table1.gin); table: gin files",
    )
    ap.add_argument("--bind", action="append", default=[], help="table: a gin binding for the sweep (repeatable)")
    args = ap.parse_intermixed_args(argv)
    if args.what == "throughput":
        rows = throughput()
    elif args.what == "methods":
        tables = [a for a in args.args if a.endswith(".gin")] or ["gin/table1.gin"]
        rows = methods([a for a in args.args if not a.endswith(".gin")], tables)
    elif args.what == "runs":
        rows = runs(args.args or ["results/table1"])
    elif args.what in ("decode", "pipeline", "shards", "finetune"):
        from harness import bench_data

        rows = getattr(bench_data, args.what)(*args.args)
    else:
        rows = table(args.args or ["gin/table1.gin"], args.bind)
    OUT.mkdir(exist_ok=True)
    stem = {
        "methods": lambda: f"methods-{Path(tables[0]).stem}",
        "runs": lambda: "runs-" + "-".join(Path(a).name for a in args.args or ["table1"]),
        "table": lambda: (
            "table-"
            + "-".join(Path(a).stem for a in args.args or ["table1"])
            + (f"-{ginutil.digest(args.bind)[:6]}" if args.bind else "")
        ),
    }.get(args.what, lambda: args.what)()
    store.write_json(OUT / f"{stem}.json", {"machine": machine(), "rows": rows})
    print(f"wrote {OUT / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
