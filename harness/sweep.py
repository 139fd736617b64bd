"""Run a table: ``python -m harness.sweep GIN [GIN ...] [--bind KEY=VALUE] [--only M1,M2]
[--dry-run] [--results DIR]``.

Expands the table's grid (methods x seeds x swept values) into RunSpecs, parses
each one's gin up front (so a typo fails before anything trains), skips runs whose
``run.json`` says done, launches the rest, and collates the leaderboard.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Sequence

from harness import collate, ginutil, store
from harness import launch as launch_lib
from harness.runspec import RunSpec
from harness.table import Table


def plan(gin_files: Sequence[str], bindings: Sequence[str], only: Sequence[str] | None,
         results: str) -> tuple[Table, list[RunSpec]]:
    """The table and its RunSpecs, each parsed once to validate it and compute its ids."""
    ginutil.parse(gin_files, bindings)
    table = Table()
    table.name = table.name or Path(gin_files[0]).stem
    methods = table.methods
    if only:
        unknown = [m for m in only if m not in methods]
        for m in unknown:
            ginutil.method_gin(m)  # unknown anywhere: suggests names
        if unknown:
            raise ginutil.GinError(f"--only {','.join(unknown)}: not in table {table.name} "
                                   f"(its methods: {', '.join(methods)})")
        methods = [m for m in methods if m in only]
    specs, seen = [], set()
    files = [str(Path(f).resolve()) if Path(f).is_file() else f for f in gin_files]
    for method in methods:
        mfile = str(ginutil.method_gin(method))
        for seed in table.seeds:
            for point in table.points():
                binds = (f"job.run.seed = {seed}", *(f"{k} = {v}" for k, v in point), *bindings)
                ginutil.parse([mfile, *files], binds)
                pre, run = ginutil.ids()
                if run in seen:
                    continue
                seen.add(run)
                specs.append(RunSpec(table=table.name, method=method, seed=seed, gin_files=(mfile, *files),
                                     bindings=binds, results=str(Path(results).resolve()), swept=point,
                                     run_id=run, pretrain_id=pre))
    return table, specs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_state(spec: RunSpec, queued: dict[str, str] | None) -> tuple[str, str]:
    """``(state, detail)`` of a run from the store and the queue.

    States: ``done``; ``skipped`` (the method refused the data, with its reason); ``pending``/``running``/... (its SLURM job, from squeue);
    ``running`` (a local process alive on this host); ``failed`` (with the error's first
    line and the log); ``todo`` (never run, or a stale marker whose job is gone).
    """
    folder = store.run_dir(spec.results, spec.table, spec.run_id)
    rec = store.read_json(folder / "run.json") or {}
    if rec.get("status") == "done":
        return "done", ""
    if rec.get("status") == "skipped":  # the method cannot run on this data; re-running changes nothing
        return "skipped", rec.get("error") or ""
    marker = store.read_json(folder / "queued.json") or {}
    job_id = marker.get("job_id")
    if job_id and queued is not None and job_id in queued:
        return queued[job_id].lower(), f"job {job_id}, log {marker.get('log')}"
    if rec.get("status") == "running" and rec.get("host") == socket.gethostname() and _alive(rec.get("pid", -1)):
        return "running", f"pid {rec['pid']}, log {rec.get('log')}"
    if rec.get("status") == "failed":
        return "failed", f"{(rec.get('error') or '').splitlines()[0][:200]} (log {rec.get('log')})"
    if rec or marker:
        return "todo", "stale: its job is no longer queued or running"
    return "todo", ""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("gin", nargs="+", help="table gin file, then overrides (scale, launcher, ...)")
    ap.add_argument("--bind", action="append", default=[], help="a gin binding, e.g. 'trainer.Trainer.epochs = 2'")
    ap.add_argument("--only", help="comma-separated methods of the table to run")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done; train nothing")
    ap.add_argument("--status", action="store_true", help="print each run's state (store and squeue); run nothing")
    ap.add_argument("--results", default="results", help="results root; the table lands in <root>/<table>/")
    args = ap.parse_args(argv)
    only = [m.strip() for m in args.only.split(",") if m.strip()] if args.only else None
    try:
        table, specs = plan(args.gin, args.bind, only, args.results)
        ginutil.parse(args.gin, args.bind)
        launch = launch_lib.chosen()
    except (ginutil.GinError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table_dir = Path(args.results) / table.name
    queued = launch_lib.squeue_states()
    states = [(s, *run_state(s, queued)) for s in specs]
    todo = [s for s, state, _ in states if state in ("todo", "failed")]
    if args.dry_run or args.status:
        print(f"table {table.name}: {len(specs)} runs, {sum(st == 'done' for _, st, _ in states)} done, "
              f"{len(todo)} to run, results in {table_dir}/")
        print(f"{'method':<14} {'seed':>4}  {'run id':<12}  {'pretrain id':<12}  {'status':<9} "
              f"{'swept' if args.dry_run else 'detail'}")
        for s, state, detail in states:
            extra = (dict(s.swept) or "") if args.dry_run else detail
            print(f"{s.method:<14} {s.seed:>4}  {s.run_id:<12}  {s.pretrain_id:<12}  {state:<9} {extra}")
        return 0
    try:
        table_dir.mkdir(parents=True, exist_ok=True)
        probe = table_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        print(f"error: results folder {table_dir} is not writable ({err}); pass --results DIR", file=sys.stderr)
        return 2
    print(f"table {table.name}: {len(specs)} runs, {sum(st == 'done' for _, st, _ in states)} already done, "
          f"{len(specs) - len(todo) - sum(st == 'done' for _, st, _ in states)} queued or running, "
          f"{len(todo)} to run", file=sys.stderr)
    try:
        if todo and hasattr(launch, "check"):
            launch.check()
    except launch_lib.LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The table's current plan (every method, not only --only's): the leaderboard averages these
    # runs alone, never runs left in runs/ by other settings of the table.
    full = specs if not only else plan(args.gin, args.bind, None, args.results)[1]
    store.write_json(table_dir / "plan.json", {"run_ids": sorted({s.run_id for s in full}), "gin": list(args.gin),
                                               "bind": list(args.bind or [])})
    outcomes = launch.launch(todo, table_dir / "jobs") if todo else []
    if todo and not outcomes:
        print(f"check progress with: python -m harness.sweep {' '.join(args.gin)} --status", file=sys.stderr)
    failed = [(s, e) for s, e in outcomes if e is not None]
    for s, e in failed:
        rec = store.read_json(store.run_dir(s.results, s.table, s.run_id) / "run.json") or {}
        print(f"FAILED {s.method} seed={s.seed} run {s.run_id}: {rec.get('error') or str(e).splitlines()[-1]}",
              file=sys.stderr)
    collate.collate(table_dir)
    print((table_dir / "leaderboard.md").read_text())
    print(f"wrote {table_dir}/leaderboard.csv, leaderboard.md, leaderboard.png", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
