"""Run a table: ``python -m harness.sweep GIN [GIN ...] [--bind KEY=VALUE] [--only M1,M2]
[--dry-run] [--results DIR]``.

Expands the table's grid (methods x seeds x swept values) into RunSpecs, parses
each one's gin up front (so a typo fails before anything trains), skips runs whose
``run.json`` says done, launches the rest, and collates the leaderboard.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence, cast

from harness import collate, ginutil, paper, reference, store
from harness import launch as launch_lib
from harness.data import DataError
from harness.runspec import RunSpec
from harness.table import Table
from harness.trainer import check_batch


def _ignored_sweeps(table: Table, point_ids: dict[str, dict[tuple, str]]) -> dict[str, list[str]]:
    """``{swept key: [methods whose runs it does not change]}``: a key is ignored by a method
    when every value of it gives that method the same run id, whatever the other keys are."""
    out: dict[str, list[str]] = {}
    for key in table.sweep:
        for method, ids in point_ids.items():
            groups: dict[tuple, set[str]] = {}
            for point, run in ids.items():
                groups.setdefault(tuple(kv for kv in point if kv[0] != key), set()).add(run)
            if all(len(runs) == 1 for runs in groups.values()):
                out.setdefault(key, []).append(method)
    return out


def plan(
    gin_files: Sequence[str],
    bindings: Sequence[str],
    only: Sequence[str] | None,
    results: str,
    notes: list[str] | None = None,
) -> tuple[Table, list[RunSpec]]:
    """The table and its RunSpecs, each parsed once to validate it and compute its ids.

    Raises:
        GinError: an empty table, an unknown method, or a swept key that no run reads.
    """
    ginutil.parse(gin_files, bindings)
    try:
        table = Table()
    except ValueError as err:
        raise ginutil.GinError(f"{' '.join(gin_files)}: {err}") from err
    except RuntimeError as err:  # gin: a required binding (table.Table.methods) is missing
        raise ginutil.GinError(
            f"{' '.join(gin_files)}: not a table: no file binds table.Table.methods. Fix: start "
            "with a table file (e.g. gin/table1.gin), or bind table.Table.methods = ['simclr']"
        ) from err
    table.name = table.name or Path(gin_files[0]).stem
    methods = table.methods
    if only is not None:
        if not only:
            raise ginutil.GinError(
                f"--only names no method. Fix: give method names, e.g. --only "
                f"{methods[0]}, or drop --only to run the whole table"
            )
        unknown = [m for m in only if m not in methods]
        for m in unknown:
            ginutil.method_gin(m)  # unknown anywhere: suggests names
        if unknown:
            raise ginutil.GinError(
                f"--only {','.join(unknown)}: not in table {table.name} (its methods: {', '.join(methods)})"
            )
        methods = [m for m in methods if m in only]
    specs, seen = [], set()
    files = [str(Path(f).resolve()) if Path(f).is_file() else f for f in gin_files]
    point_ids: dict[str, dict[tuple, str]] = {}
    for method in methods:
        run_files = tuple(ginutil.run_files(method, table.scale, files))
        for seed in table.seeds:
            for point in table.points():
                binds = (
                    f"job.run.seed = {seed}",
                    *(f"{k} = {v}" for k, v in point),
                    *table.method_bindings.get(method, ()),
                    *bindings,
                )
                ginutil.parse(run_files, binds)
                pre, run = ginutil.ids()
                if seed == table.seeds[0]:
                    point_ids.setdefault(method, {})[point] = run
                if run in seen:
                    continue
                seen.add(run)
                specs.append(
                    RunSpec(
                        table=table.name,
                        method=method,
                        seed=seed,
                        gin_files=run_files,
                        bindings=binds,
                        results=str(Path(results).resolve()),
                        swept=point,
                        run_id=run,
                        pretrain_id=pre,
                    )
                )
                _facts[run] = _run_facts()
    for key, ignored in _ignored_sweeps(table, point_ids).items():
        if len(ignored) == len(methods):
            raise ginutil.GinError(
                f"table.Table.sweep: {key!r} changes no run of table {table.name} (methods {', '.join(methods)}): "
                "no method reads it, so its values would collapse into one run. Fix: check the key's spelling and "
                "that the table's methods use that configurable, or drop it from the sweep"
            )
        if notes is not None:
            notes.append(
                f"note: swept key {key!r} does not change the runs of {', '.join(ignored)}: "
                f"one run each instead of {len(table.sweep[key])}"
            )
    return table, specs


class _Facts(NamedTuple):
    """What the preflight checks need of one run's parsed config (kept from `plan`: gin is cleared between
    runs)."""

    dataset: object | None  # unloaded
    batch_size: int | None
    pretrains: bool
    pipeline: object | None  # the trainer's input pipeline
    protocols: tuple  # the run's evaluations


_facts: dict[str, _Facts] = {}  # per run id


def _run_facts() -> _Facts:
    try:
        dataset = ginutil.reference("job.run.dataset")
    except ValueError:
        return _Facts(None, None, False, None, ())
    method = ginutil.reference("job.run.method")
    pretrains = getattr(method, "pretrain_steps", None) is None
    try:
        trainer = ginutil.reference("job.run.trainer")
    except ValueError:
        trainer = None
    try:
        evaluations = ginutil.reference("job.run.evaluations")
    except ValueError:
        evaluations = []
    protocols = tuple(evaluations) if isinstance(evaluations, (list, tuple)) else ()
    return _Facts(
        dataset, getattr(trainer, "batch_size", None), pretrains, getattr(trainer, "pipeline", None), protocols
    )


def check_layout(layout: paper.Layout, table: Table, specs: Sequence[RunSpec], where: str) -> None:
    """Checks a paper table's layout against the table (`harness.paper.check`), with the protocols
    of each method's first run (parsed here: a protocol's settings may depend on the scale).

    Raises:
        paper.LayoutError: naming the gin files, the layout key and the fix.
    """
    evaluations: dict[str, object] = {}
    for spec in {s.method: s for s in reversed(specs)}.values():
        ginutil.parse(spec.gin_files, spec.bindings)
        listed = ginutil.reference("job.run.evaluations")
        evaluations |= {p.name: p for p in (listed if isinstance(listed, list) else [])}
    swept = {k: [repr(v) for v in values] for k, values in table.sweep.items()}
    paper.check(layout, table.methods, swept, list(evaluations.values()), where)


def preflight(specs: Sequence[RunSpec]) -> None:
    """Checks, before any job starts, that each run's data exists and can fill a batch.

    Raises:
        DataError: a data folder or file missing (the dataset's, or a protocol's: a VOC tree, a subset
            file), or an input pipeline that cannot run here (its message names the key and the fix).
        ValueError: a batch larger than the pretraining images.
    """
    counts: dict[int, int] = {}
    for spec in specs:
        facts = _facts.get(spec.run_id, _Facts(None, None, False, None, ()))
        if facts.pretrains and hasattr(facts.pipeline, "check"):
            cast(Any, facts.pipeline).check()  # e.g. the DALI decoder without CUDA or DALI
        for protocol in facts.protocols:  # their data (VOC trees, subset files): missing, it fails after pretraining
            if hasattr(protocol, "check"):
                protocol.check()
        dataset: Any = facts.dataset
        if dataset is None or not hasattr(dataset, "check"):
            continue
        if id(dataset) not in counts:
            counts[id(dataset)] = dataset.check()
        if facts.pretrains and facts.batch_size is not None:
            try:
                check_batch(facts.batch_size, counts[id(dataset)])
            except ValueError as err:
                raise ValueError(f"run {spec.method} seed={spec.seed}: {err}") from err


def _print_budgets(spec: RunSpec) -> None:
    """Prints what each training protocol of `spec`'s run will cost (steps, batch, images seen),
    computed from its settings and the run's training split; a note when the data is missing."""
    from harness.evals import protocol as protocol_lib

    ginutil.parse(spec.gin_files, spec.bindings)
    evaluations = ginutil.reference("job.run.evaluations")
    protocols = [e for e in (evaluations if isinstance(evaluations, list) else []) if hasattr(e, "budget")]
    if not protocols:
        return
    try:  # the data, and what the protocols read beside it (e.g. subset files)
        lines = protocol_lib.budget_lines(protocols, ginutil.reference("job.run.dataset").split("train"))
    except (DataError, OSError) as err:
        print(f"protocol budgets: need the data ({str(err).splitlines()[0]})")
        return
    print(f"protocol budgets ({spec.method} seed={spec.seed}; the same for every run of these settings):")
    for line in lines:
        print(f"  {line}")


def run_state(spec: RunSpec, queued: dict[str, str] | None) -> tuple[str, str]:
    """``(state, detail)`` of a run from the store and the queue.

    States: ``done`` (a complete record whose files all match); ``skipped`` (the method
    refused the data, with its reason); ``pending``/``running``/... (its SLURM job, from
    squeue); ``running`` (a live process holds the run's lock); ``failed`` (with the error's
    first line and the log); ``interrupted`` (its process died or was stopped); ``invalid``
    (a done record that fails its checks, with the reason); ``todo`` (never run, or a stale
    marker whose job is gone). The sweep runs failed, interrupted, invalid and todo runs.
    """
    folder = store.run_dir(spec.results, spec.table, spec.run_id)
    rec = store.read_json(folder / "run.json")
    status, reason = store.effective_status(folder, rec) if rec is not None else (None, "")
    rec = rec or {}
    if status in (store.Status.DONE, store.Status.SKIPPED):
        return str(status), reason
    marker = store.read_json(folder / "queued.json") or {}
    job_id = marker.get("job_id")
    if job_id and queued is not None and job_id in queued:
        return queued[job_id].lower(), f"job {job_id}, log {marker.get('log')}"
    if status == store.Status.RUNNING:
        return str(status), f"pid {rec.get('pid')} on {rec.get('host')}, log {rec.get('log')}"
    if status == store.Status.FAILED:
        return str(status), f"{(rec.get('error') or '').splitlines()[0][:200]} (log {rec.get('log')})"
    if status in (store.Status.INTERRUPTED, store.Status.INVALID):
        return str(status), reason.splitlines()[0][:300] if reason else ""
    if rec is not None or marker or folder.is_dir() and (folder / "run.json").exists():
        return "todo", "stale: its job is no longer queued or running"
    return "todo", ""


TO_RUN = ("todo", store.Status.FAILED.value, store.Status.INTERRUPTED.value, store.Status.INVALID.value)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("gin", nargs="+", help="table gin file, then overrides (scale, launcher, ...)")
    ap.add_argument("--bind", action="append", default=[], help="a gin binding, e.g. 'trainer.Trainer.epochs = 2'")
    ap.add_argument("--only", help="comma-separated methods of the table to run")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done; train nothing")
    ap.add_argument("--status", action="store_true", help="print each run's state (store and squeue); run nothing")
    ap.add_argument("--results", default="results", help="results root; the table lands in <root>/<table>/")
    ap.add_argument(
        "--explain",
        action="append",
        default=[],
        metavar="KEY",
        help="with --dry-run: for each run, the value of KEY (e.g. trainer.Trainer.batch_size) and "
        "the file and line that set it",
    )
    ap.add_argument(
        "--reference",
        action="append",
        default=[],
        type=Path,
        metavar="CSV_OR_DIR",
        help="published numbers in reference/published.csv's schema (a CSV or a folder of them), added to the "
        "shipped ones beside the leaderboard",
    )
    args = ap.parse_intermixed_args(argv)  # gin files may follow options: ... --bind "k = v" gin/launch/slurm.gin
    references = [reference.SHIPPED, *args.reference]
    only = [m.strip() for m in args.only.split(",") if m.strip()] if args.only is not None else None
    notes: list[str] = []
    try:
        table, specs = plan(args.gin, args.bind, only, args.results, notes)
        ginutil.parse(args.gin, args.bind)
        layout = paper.bound(" ".join(args.gin))  # a paper table (gin/paper/*.gin): its printed layout
        launch = launch_lib.chosen()
        collate.load_reference(references)  # a malformed reference stops the sweep before anything trains
        if layout is not None:
            check_layout(layout, table, specs, " ".join(args.gin))
    except (ginutil.GinError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(note, file=sys.stderr)
    table_dir = Path(args.results) / table.name
    # squeue only when a run was submitted to SLURM (its queued.json marker): no other state
    # depends on it, and where SLURM is installed but its controller is down it waits ~9 s.
    submitted = any(launch_lib.marker_path(s).exists() for s in specs)
    queued = launch_lib.squeue_states() if submitted else None
    states = [(s, *run_state(s, queued)) for s in specs]
    todo = [s for s, state, _ in states if state in TO_RUN]
    if args.dry_run or args.status:
        print(
            f"table {table.name}: {len(specs)} runs, {sum(st == 'done' for _, st, _ in states)} done, "
            f"{len(todo)} to run, results in {table_dir}/"
        )
        print(
            f"{'method':<14} {'seed':>4}  {'run id':<12}  {'pretrain id':<12}  {'status':<11} "
            f"{'swept' if args.dry_run else 'detail'}"
        )
        for s, state, detail in states:
            extra = (dict(s.swept) or "") if args.dry_run else detail
            print(f"{s.method:<14} {s.seed:>4}  {s.run_id:<12}  {s.pretrain_id:<12}  {state:<11} {extra}")
            if args.explain:
                ginutil.parse(s.gin_files, s.bindings)
                try:
                    for key in args.explain:
                        print(f"    {ginutil.explain(key, s.gin_files, s.bindings)}")
                except ginutil.GinError as err:
                    print(f"error: {err}", file=sys.stderr)
                    return 2
        if args.dry_run and specs:
            _print_budgets(specs[0])
        if args.dry_run and layout is not None:
            print("\n".join(paper.estimate_lines(layout, specs)))
        return 0
    try:  # what can be checked before any job starts: the data, batch sizes, the launcher
        preflight(todo)
        if todo and hasattr(launch, "check"):
            launch.check()
    except (DataError, ValueError, launch_lib.LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    created = [d for d in (table_dir, *table_dir.parents) if not d.exists()]  # removed again if nothing launches
    try:
        table_dir.mkdir(parents=True, exist_ok=True)
        probe = table_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        print(f"error: results folder {table_dir} is not writable ({err}); pass --results DIR", file=sys.stderr)
        return 2
    print(
        f"table {table.name}: {len(specs)} runs, {sum(st == 'done' for _, st, _ in states)} already done, "
        f"{len(specs) - len(todo) - sum(st == 'done' for _, st, _ in states)} queued or running, "
        f"{len(todo)} to run",
        file=sys.stderr,
    )
    # The table's current plan (every method, not only --only's): the leaderboard averages these
    # runs alone, never runs left in runs/ by other settings of the table.
    full = specs if not only else plan(args.gin, args.bind, None, args.results)[1]
    store.write_json(
        table_dir / "plan.json",
        {"run_ids": sorted({s.run_id for s in full}), "gin": list(args.gin), "bind": list(args.bind or [])},
    )
    if layout is not None:  # collate prints paper_table.md in it
        store.write_json(
            table_dir / paper.LAYOUT_JSON, {"gin": list(args.gin), "bind": list(args.bind), "layout": layout.to_dict()}
        )
    else:  # no longer a paper table
        (table_dir / paper.LAYOUT_JSON).unlink(missing_ok=True)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)  # SIGTERM stops local jobs as Ctrl-C does
    try:
        outcomes = launch.launch(todo, table_dir / "jobs") if todo else []
    except launch_lib.LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        if created:  # nothing was submitted: leave no folder this command made
            shutil.rmtree(created[-1], ignore_errors=True)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: the sweep's running jobs were stopped and recorded as interrupted; run the same "
            "command again to resume them",
            file=sys.stderr,
        )
        collate.collate(table_dir, references)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if todo and not outcomes:
        print(f"check progress with: python -m harness.sweep {' '.join(args.gin)} --status", file=sys.stderr)
    failed = [(s, e) for s, e in outcomes if e is not None]
    for s, e in failed:
        rec = store.read_json(store.run_dir(s.results, s.table, s.run_id) / "run.json") or {}
        print(
            f"FAILED {s.method} seed={s.seed} run {s.run_id}: {rec.get('error') or str(e).splitlines()[-1]}",
            file=sys.stderr,
        )
    collate.collate(table_dir, references)
    print((table_dir / "leaderboard.md").read_text())
    print(f"wrote {table_dir}/leaderboard.csv, leaderboard.md, leaderboard.png", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
