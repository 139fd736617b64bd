"""Collate a table's run.json files into a leaderboard (csv, markdown, png).

Reads every ``<table_dir>/runs/<run_id>/run.json`` into one long DataFrame (a row per
run and metric), reduces finished runs to mean ± std over seeds per method and swept
setting, sets published numbers beside them (``reference/published.csv`` and any
``--reference`` files: matched on conditions with Δ and a verdict, else the nearest one,
labelled with its conditions; `harness.published`), measures how well the table's ranking
agrees with the published one (`harness.agreement`), and writes leaderboard.csv/.md/.png,
rank_agreement.png and failed.csv. Failed or unfinished runs are listed, never
averaged; nor are numbers of different protocol settings (run.json records each metric's
protocol id; a metric made under two ids in one table becomes two columns, ``<metric>
[<id>]``, and leaderboard.md lists every protocol's name, id and settings).
A paper table (``gin/paper/*.gin``) is also written in the paper's layout, paper_table.md/.csv
(`harness.paper`), from the layout the sweep left in ``layout.json`` or from ``--layout``.
Usage: ``python -m harness.collate results/table1 [--reference DIR_OR_CSV ...] [--layout GIN_OR_JSON]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness import agreement, ginutil, paper, published, reference, store
from harness.store import Status

RUN_COLUMNS = [
    "run_id",
    "pretrain_id",
    "table",
    "method",
    "seed",
    "status",
    "metric",
    "value",
    "protocol",
    "protocol_id",
    "pretrain_s",
    "eval_s",
]
SORT_METRIC = "linear/top1"
PLOT_METRICS = ["linear/top1", "knn/top1@200"]
STATS = {"mean": "mean", "std": "std", "count": "n"}  # pandas aggregation -> column suffix


def _read_run(path: Path) -> dict | None:
    """Returns the run record at ``path``, or None with a warning when missing or corrupt."""
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # being written, or killed mid-write
        warnings.warn(f"{path}: missing or unreadable ({type(err).__name__}); run skipped")
        return None
    if isinstance(run, dict) and run.get("run_id") and run.get("method"):
        return run
    warnings.warn(f"{path}: not a run record (no run_id or method); run skipped")
    return None


def _rows(run: dict) -> list[dict]:
    """Flattens one run record into one row per metric (one row with NaN metric if none)."""
    timings = run.get("timings") or {}
    row = {key: run.get(key) for key in RUN_COLUMNS[:6]}
    row |= {"pretrain_s": timings.get("pretrain_s", np.nan), "eval_s": timings.get("eval_s", np.nan)}
    for key, value in (run.get("swept") or {}).items():
        row[f"swept:{key}"] = value if np.isscalar(value) or value is None else json.dumps(value)
    warned = run.get("warnings") or []
    row |= {"error": run.get("error"), "log": run.get("log"), "warning": "; ".join(map(str, warned)) or None}
    metrics = (run.get("metrics") or {}) if row["status"] == Status.DONE else {}
    if not metrics:
        return [row | {"metric": np.nan, "value": np.nan}]
    owner = {m: (name, p.get("id")) for name, p in _protocols(run).items() for m in p.get("metrics") or []}
    return [
        row
        | {
            "metric": metric,
            "value": value,
            "protocol": owner.get(metric, (None, None))[0],
            "protocol_id": owner.get(metric, (None, None))[1],
        }
        for metric, value in metrics.items()
    ]


def _protocols(run: dict) -> dict[str, dict]:
    """The run's protocol records that name their id and metrics (older records: none)."""
    return {name: p for name, p in (run.get("protocols") or {}).items() if isinstance(p, dict) and "id" in p}


def _split_protocols(df: pd.DataFrame) -> pd.DataFrame:
    """Renames a metric made under more than one protocol id in the table to ``<metric> [<id>]``
    (``[unrecorded]`` where a run did not record its protocol), so no mean mixes settings."""
    scored = df["metric"].notna()
    ids = df["protocol_id"].where(df["protocol_id"].notna(), "unrecorded")
    mixed = ids[scored].groupby(df.loc[scored, "metric"]).nunique()
    mixed = df["metric"].isin(mixed[mixed > 1].index)
    if not mixed.any():
        return df
    df.loc[mixed, "metric"] = df.loc[mixed, "metric"] + " [" + ids[mixed].astype(str) + "]"
    return df


def load_runs(table_dir: Path) -> pd.DataFrame:
    """Reads every ``runs/*/run.json`` of a table into one long frame.

    Args:
        table_dir: The table's results folder, e.g. ``results/table1``.

    Returns:
        One row per (run, metric); failed and running runs have one row with NaN metric
        and value. A metric made under several protocol ids is split (`_split_protocols`).
        Only the runs of the table's current plan (``plan.json``, written by the sweep) when it
        has one: runs of older settings stay on disk, out of the means (``attrs["outside_plan"]``).
        ``attrs["skipped"]`` counts run folders without a readable run.json; ``attrs["protocols"]``
        maps (name, id) of the finished runs' protocols to their settings and metrics;
        ``attrs["conditions"]`` maps a method to its first finished run's conditions and
        ``attrs["run_conditions"]`` a finished run's id to its own.
    """
    runs_dir = Path(table_dir) / "runs"
    folders = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    plan = store.read_json(Path(table_dir) / "plan.json")
    planned = set(plan["run_ids"]) if plan and "run_ids" in plan else None
    outside = [f for f in folders if planned is not None and f.name not in planned]
    folders = [f for f in folders if planned is None or f.name in planned]
    records = []
    for folder in folders:
        run = _read_run(folder / "run.json")
        if run:  # as it stands now: a done record that fails its checks is invalid, a dead 'running' interrupted
            status, reason = store.effective_status(folder, run)
            if status != run.get("status"):
                run = {**run, "status": status, "error": reason}
            records.append(run)
    rows = [row for run in records for row in _rows(run)]
    swept = sorted({key for row in rows for key in row if key.startswith("swept:")})
    as_bound = {c: pd.Series([r.get(c) for r in rows], dtype=object) for c in swept}  # ints stay ints
    df = pd.DataFrame(rows).assign(**as_bound).reindex(columns=RUN_COLUMNS + swept + ["error", "log", "warning"])
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df = _split_protocols(df)
    df.attrs["skipped"] = len(folders) - len(records)
    df.attrs["outside_plan"] = len(outside)
    df.attrs["protocols"], df.attrs["conditions"], df.attrs["run_conditions"] = {}, {}, {}
    for run in (r for r in records if r.get("status") == Status.DONE.value):
        df.attrs["conditions"].setdefault(run["method"], run.get("conditions") or {})
        df.attrs["run_conditions"][run["run_id"]] = run.get("conditions") or {}
        cost = (run.get("timings") or {}).get("protocols") or {}
        for name, p in _protocols(run).items():
            entry = df.attrs["protocols"].setdefault(
                (name, p["id"]), {"params": p.get("params"), "metrics": set(), "budgets": set(), "cpu_s": []}
            )
            entry["metrics"].update(p.get("metrics") or [])
            if budget := _budget(p.get("selected")):
                entry["budgets"].add(budget)
            if isinstance(cost.get(name), dict) and cost[name].get("cpu_s") is not None:
                entry["cpu_s"].append(float(cost[name]["cpu_s"]))
    return df


def _budget(selected: object) -> str:
    """What a training protocol's run took, from its record's ``selected``: ``steps x batch
    (images seen)``, per part (``1%: ...; 10%: ...``) where it trains more than once; '' when
    it records none (frozen-feature protocols)."""
    if not isinstance(selected, dict):
        return ""
    parts = (
        {"": selected["budget"]}
        if isinstance(selected.get("budget"), dict)
        else {
            tag: v["budget"] for tag, v in selected.items() if isinstance(v, dict) and isinstance(v.get("budget"), dict)
        }
    )
    return "; ".join(
        f"{tag + ': ' if tag else ''}{b['steps']:,} steps x {b['batch']} ({b['images_seen']:,} images)"
        for tag, b in parts.items()
        if {"steps", "batch", "images_seen"} <= set(b)
    )


def _keys(df: pd.DataFrame) -> list[str]:
    """Returns the columns a leaderboard row is keyed by: method, then swept keys."""
    return ["method"] + [c for c in df.columns if c.startswith("swept:")]


def leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """Reduces finished runs to one row per method (and swept setting).

    Args:
        df: A frame from :func:`load_runs`.

    Returns:
        Columns: the keys, then ``<metric> mean``, ``<metric> std`` (ddof=1, NaN for one
        seed), ``<metric> n`` per metric, then ``seeds`` (finished runs) and ``cost_s``
        (mean pretrain + eval seconds per run), ``note``; best ``linear/top1`` mean first, then
        methods whose runs were all skipped (no numbers; ``note`` gives the reason).
    """
    keys = _keys(df)
    done = df[df["status"] == Status.DONE.value]
    runs = done.drop_duplicates("run_id")
    runs = runs.assign(cost_s=runs[["pretrain_s", "eval_s"]].sum(axis=1, min_count=1))
    board = runs.groupby(keys, dropna=False).agg(seeds=("run_id", "size"), cost_s=("cost_s", "mean"))
    scored = done.dropna(subset=["metric"])
    metrics = list(pd.unique(scored["metric"]))
    stats = scored.groupby(keys + ["metric"], dropna=False)["value"].agg(["mean", "std", "count"])
    stats = stats.unstack("metric") if metrics else stats
    columns = {f"{m} {name}": stats[(stat, m)] for m in metrics for stat, name in STATS.items()}
    board = board.join(pd.DataFrame(columns, index=board.index)).reset_index()
    counts = [f"{m} n" for m in metrics]
    board[counts] = board[counts].fillna(0).astype(int)
    board = board[keys + list(columns) + ["seeds", "cost_s"]]
    by = [f"{m} mean" for m in ([SORT_METRIC] if SORT_METRIC in metrics else metrics[:1])]
    board = board.sort_values(by + ["method"], ascending=[False] * len(by) + [True], kind="stable")
    warned = runs.dropna(subset=["warning"]).groupby(keys, dropna=False)["warning"].first()
    board["note"] = [
        ("warning: " + warned[k]) if k in warned.index else ""
        for k in (board[keys[0]] if len(keys) == 1 else board[keys].itertuples(index=False, name=None))
    ]
    skipped = df[df["status"] == Status.SKIPPED.value].drop_duplicates(keys)  # methods that refused the data
    skipped = skipped[~skipped.set_index(keys).index.isin(board.set_index(keys).index)]
    if not skipped.empty:
        rows = skipped[keys].assign(seeds=0, note="skipped: " + skipped["error"].fillna("").astype(str))
        board = pd.concat([board, rows], ignore_index=True)
        board[counts] = board[counts].fillna(0).astype(int)
    return board.reset_index(drop=True)


NOT_COUNTED = [Status.FAILED.value, Status.INTERRUPTED.value, Status.INVALID.value]


def failed_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Returns one row per run that ended without numbers the table can use (failed,
    interrupted, or a done record that failed its checks): method, seed, swept keys, run id,
    status, error (the reason), log."""
    failed = df[df["status"].isin(NOT_COUNTED)].drop_duplicates("run_id")
    return failed[["method", "seed", *_keys(df)[1:], "run_id", "status", "error", "log"]]


def load_reference(paths: Sequence[Path] = (reference.SHIPPED,)) -> pd.DataFrame:
    """The checked published numbers of `paths` (CSV files in ``reference/published.csv``'s
    schema, or folders of them), batch size and epochs kept as strings.

    Raises:
        reference.ReferenceError: a file or folder is missing or a row is malformed (names file and line).
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.glob("*.csv"))
        elif path.is_file():
            files.append(path)
        else:
            raise reference.ReferenceError(f"{path}: no such reference file or folder")
    frames = [reference.read(f) for f in files]
    if not frames:
        return pd.DataFrame(columns=reference.COLUMNS)
    return pd.concat(frames, ignore_index=True)


def _cell(mean: float, std: float = np.nan) -> str:
    """Formats ``mean ± std`` to one decimal; blank for NaN mean, mean alone for NaN std."""
    if pd.isna(mean):
        return ""
    return f"{mean:.1f}" if pd.isna(std) else f"{mean:.1f} ± {std:.1f}"


def _markdown_board(board: pd.DataFrame) -> str:
    """Renders the leaderboard as a markdown table with ``mean ± std`` cells."""
    shown = board[_keys(board)].rename(columns=lambda c: c.removeprefix("swept:"))
    for metric in (c.removesuffix(" mean") for c in board.columns if c.endswith(" mean")):  # published: own section
        shown[metric] = [_cell(m, s) for m, s in zip(board[f"{metric} mean"], board[f"{metric} std"])]
    shown["seeds"] = board["seeds"]
    shown["cost_s"] = board["cost_s"].map(lambda s: f"{s:.0f}" if pd.notna(s) else "")
    if "note" in board and board["note"].fillna("").astype(bool).any():
        shown["note"] = board["note"].fillna("").astype(str).str.replace("|", r"\|")
    return shown.to_markdown(index=False, disable_numparse=True)


def _markdown_published(placed: pd.DataFrame, agreed: dict | None) -> list[str]:
    """The published-numbers section: matched ones with Δ and verdict, the others as the nearest, labelled."""
    lines = []
    if not placed.empty:
        matched = int(placed["matched"].sum())
        shown = placed.assign(
            ours=placed["ours"].map(_cell),
            published=placed["published"].map(_cell),
            Δ=[f"{d:+.1f}" if m else "" for d, m in zip(placed["Δ"], placed["matched"])],
        ).drop(columns="matched")
        shown = shown.apply(lambda col: col.astype(str).str.replace("|", r"\|"))
        lines += [
            "## Published numbers",
            "",
            f"{matched} of {len(placed)} published numbers below were measured under this table's conditions "
            f"(dataset, backbone, pretraining epochs, protocol, metric; batch size where the source states one) "
            f"with the method's standard recipe: those have Δ (ours - published) and a "
            f"verdict (reproduced within the source's spread, else ±{published.DEFAULT_TOLERANCE:g} points). The "
            "others are the nearest published number of the same kind, under the conditions named beside it: "
            "context, not a comparison. leaderboard.csv has them as columns.",
            "",
            shown.to_markdown(index=False, disable_numparse=True),
            "",
        ]
    if agreed is not None:
        lines += ["## Rank agreement", "", agreement.describe(agreed) + " rank_agreement.png plots it.", ""]
        if agreed["n"]:
            points = agreed["points"].assign(ours=agreed["points"]["ours"].map(_cell))
            lines += [points.to_markdown(index=False, disable_numparse=True, floatfmt=".1f"), ""]
    return lines


def _markdown_protocols(protocols: dict) -> list[str]:
    """The protocols section: name, id, metrics and settings of every protocol in the table."""
    if not protocols:
        return []
    rows = [
        {
            "protocol": name,
            "id": pid,
            "metrics": ", ".join(sorted(p["metrics"])),
            "training (per run)": " / ".join(sorted(p.get("budgets") or [])) or "-",
            "CPU s (median, range)": _cpu_text(p.get("cpu_s") or []),
            "settings": json.dumps(p["params"], sort_keys=True, separators=(", ", ": ")),
        }
        for (name, pid), p in sorted(protocols.items(), key=lambda item: (item[0][0], str(item[0][1])))
    ]
    table = pd.DataFrame(rows).apply(lambda col: col.str.replace("|", r"\|"))
    return [
        "## Protocols",
        "",
        "Every number above was made by one of these protocols (id: a hash of the name and "
        "settings; a column labelled `[<id>]` holds a metric that this table has under more than one id). "
        "Training: optimizer steps x batch and images seen, as the runs recorded them; CPU s: each run's "
        "process time in the protocol, over the finished runs.",
        "",
        table.to_markdown(index=False, disable_numparse=True),
        "",
    ]


def _cpu_text(seconds: list[float]) -> str:
    """``median (min-max)`` of the runs' CPU seconds, or '-' when none was recorded."""
    if not seconds:
        return "-"
    lo, mid, hi = min(seconds), float(np.median(seconds)), max(seconds)
    return f"{mid:.0f}" if len(seconds) == 1 else f"{mid:.0f} ({lo:.0f}-{hi:.0f})"


def render_markdown(
    df: pd.DataFrame, board: pd.DataFrame, placed: pd.DataFrame, agreed: dict | None, table: str
) -> str:
    """Builds leaderboard.md: title, table, published numbers, rank agreement, protocols, failed and pending runs."""
    lines = [f"# {table} leaderboard", ""]
    if board.empty:
        lines += ["No finished runs yet, so there is nothing to average.", ""]
    else:
        lines += [
            "Mean ± std over seeds (%); cost_s: mean wall time per run (pretrain + eval).",
            "",
            _markdown_board(board),
            "",
        ]
    lines += _markdown_published(placed, agreed)
    lines += _markdown_protocols(df.attrs.get("protocols") or {})
    failed = failed_runs(df).fillna("").astype(str)
    if not failed.empty:
        failed = failed.apply(lambda col: col.str.replace("|", r"\|").str.replace("\n", " "))
        lines += [
            "## Failed runs",
            "",
            "Failed, interrupted, or finished with a record or file that failed its "
            "checks: not in the table; the sweep runs them again.",
            "",
            failed.to_markdown(index=False, disable_numparse=True),
            "",
        ]
    ended = [Status.DONE.value, Status.SKIPPED.value, *NOT_COUNTED]
    pending = df[~df["status"].isin(ended)].drop_duplicates("run_id")["status"].fillna("?")
    counts = {**pending.value_counts(), "without a readable run.json": df.attrs.get("skipped", 0)}
    if total := sum(counts.values()):
        detail = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
        lines += [f"{total} run(s) still running or incomplete ({detail}); not in the table.", ""]
    if n := df.attrs.get("outside_plan", 0):
        lines += [f"{n} run(s) in runs/ belong to other settings of this table (not in plan.json); left out.", ""]
    return "\n".join(lines)


def _labels(frame: pd.DataFrame) -> pd.Series:
    """Returns one x-axis label per row: the method, then swept values on a second line."""
    swept = _keys(frame)[1:]
    return frame.apply(
        lambda r: "\n".join([str(r["method"])] + [f"{c.rsplit('.', 1)[-1]}={r[c]}" for c in swept if pd.notna(r[c])]),
        axis=1,
    )


def plot_leaderboard(df: pd.DataFrame, board: pd.DataFrame, path: Path, table: str) -> None:
    """Saves top-1 per method (mean ± std, one dot per seed) to ``path`` as a PNG."""
    done = df[(df["status"] == Status.DONE.value) & df["metric"].notna()]
    present = list(pd.unique(done["metric"]))
    metrics = [m for m in PLOT_METRICS if m in present] or present[:2]
    fig = Figure(figsize=(max(6.0, 1.3 * len(board) + 2.5), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if board.empty or not metrics:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
    else:
        data = done[done["metric"].isin(metrics)]
        data = data.assign(label=_labels(data))
        style = dict(x="label", y="value", hue="metric", order=list(_labels(board)), hue_order=metrics, ax=ax)
        sns.stripplot(data, **style, dodge=True, palette={m: "0.3" for m in metrics}, size=4, alpha=0.7, legend=False)
        dodge = 0.4 if len(metrics) > 1 else False  # seaborn divides by (hue levels - 1)
        sns.pointplot(data, **style, dodge=dodge, errorbar="sd", capsize=0.1, linestyle="none", markers="D")
        ax.set(xlabel="", ylabel="accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{table}: {', '.join(metrics) or 'top-1'} per method, mean ± std (grey dots: seeds)")
    _atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Calls ``write`` on a temp file beside ``path``, then renames it onto ``path``."""
    with store.atomic_path(path) as tmp:
        write(tmp)


def collate(
    table_dir: Path,
    references: Sequence[Path] = (reference.SHIPPED,),
    agree_on: str = SORT_METRIC,
    layout: paper.Layout | None = None,
) -> pd.DataFrame:
    """Writes a table's leaderboard.csv/.md/.png, rank_agreement.png (and failed.csv) and returns the board;
    for a paper table, also paper_table.md/.csv in the paper's layout (`harness.paper.render`).

    Args:
        table_dir: The table's results folder, holding ``runs/<run_id>/run.json``.
        references: published-number CSVs or folders of them (`load_reference`); () for none.
        agree_on: the metric whose ranking is set against the published one (`harness.agreement`).
        layout: the paper layout to print; None: the one the sweep wrote (``layout.json``), if any.

    Returns:
        The :func:`leaderboard` frame plus the published columns of `harness.published.annotate`.
    Raises:
        reference.ReferenceError: a reference file is missing or malformed (before anything is written).
        paper.LayoutError: the table folder's layout.json is unreadable (before anything is written).
    """
    table_dir = Path(table_dir)
    if not table_dir.is_dir():
        raise FileNotFoundError(f"{table_dir}: no such table folder; pass e.g. results/table1")
    ref = load_reference(references)
    if layout is None and (table_dir / paper.LAYOUT_JSON).is_file():
        layout = paper.load(table_dir / paper.LAYOUT_JSON)
    df = load_runs(table_dir)
    table = str(df["table"].dropna().iloc[0]) if df["table"].notna().any() else table_dir.name
    board = leaderboard(df)
    made_by = df.dropna(subset=["metric", "protocol"]).drop_duplicates("metric").set_index("metric")["protocol"]
    board, placed = published.annotate(board, df.attrs.get("conditions") or {}, made_by.to_dict(), ref)
    agreed = agreement.agreement(board, ref, agree_on) if len(ref) else None
    _atomic_write(table_dir / "leaderboard.csv", lambda p: board.to_csv(p, index=False))
    markdown = render_markdown(df, board, placed, agreed, table)
    _atomic_write(table_dir / "leaderboard.md", lambda p: p.write_text(markdown, encoding="utf-8"))
    plot_leaderboard(df, board, table_dir / "leaderboard.png", table)
    if agreed is not None:
        agreement.plot(agreed, table_dir / "rank_agreement.png", table)
    failed = failed_runs(df)
    if failed.empty:
        (table_dir / "failed.csv").unlink(missing_ok=True)
    else:
        _atomic_write(table_dir / "failed.csv", lambda p: failed.to_csv(p, index=False))
    if layout is not None:
        text, frame = paper.render(layout, df, board, ref)
        _atomic_write(table_dir / "paper_table.md", lambda p: p.write_text(text, encoding="utf-8"))
        _atomic_write(table_dir / "paper_table.csv", lambda p: frame.to_csv(p, index=False))
    return board


def main(argv: list[str] | None = None) -> int:
    """Command line: collate one table folder and print its leaderboard.md."""
    parser = argparse.ArgumentParser(prog="python -m harness.collate", description=__doc__.splitlines()[0])
    parser.add_argument("table_dir", type=Path, help="a table's results folder, e.g. results/table1")
    parser.add_argument(
        "--reference",
        type=Path,
        action="append",
        default=[],
        help="a CSV of published numbers in reference/published.csv's schema, or a folder of them; adds to the "
        "shipped reference/published.csv (repeatable)",
    )
    parser.add_argument(
        "--layout",
        type=Path,
        help="also write paper_table.md/.csv in a paper's layout: a paper table's gin file (gin/paper/*.gin) or a "
        "layout.json; default: the table folder's layout.json, which the sweep of a paper table writes",
    )
    args = parser.parse_args(argv)
    if not args.table_dir.is_dir():
        print(
            f"error: {args.table_dir}: no such table folder. Fix: pass a table's results folder, e.g. "
            "results/table1 (python -m harness.sweep writes one per table)",
            file=sys.stderr,
        )
        return 2
    try:
        layout = paper.load(args.layout) if args.layout else None
        collate(args.table_dir, [reference.SHIPPED, *args.reference], layout=layout)
    except reference.ReferenceError as err:
        print(f"error: {err}. Fix: correct that row (reference/README.md documents the columns)", file=sys.stderr)
        return 2
    except (paper.LayoutError, ginutil.GinError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((args.table_dir / "leaderboard.md").read_text(encoding="utf-8"))
    if layout is not None or (args.table_dir / paper.LAYOUT_JSON).is_file():
        print((args.table_dir / "paper_table.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
