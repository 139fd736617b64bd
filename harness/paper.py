"""Paper tables: a published table's rows and columns, filled with a table's own numbers beside
the published ones (issue 15).

A paper table gin file (``gin/paper/*.gin``) is an ordinary table (``table.Table``: methods,
seeds, scale; ``job.run.evaluations``: the protocols) that also binds `Layout`: the printed
table's rows (a method, and the swept setting it was run at, under the paper's display name),
its columns (a harness metric under the header as printed), the conditions its published
numbers were measured under (dataset, backbone, epochs, ... as ``reference/published.csv``
spells them) and its source. `harness.sweep` checks the layout against the table before
anything runs (an unknown method, metric or swept key is an error naming the file and key),
prints the estimated GPU-hours on ``--dry-run`` (`estimate_lines`: each figure with its
source, or 'derived' with the derivation) and writes ``results/<table>/layout.json``;
`harness.collate` then writes ``paper_table.md`` and ``paper_table.csv`` beside the
leaderboard (`render`). A published number comes only from a reference row under the
layout's conditions (`published_for`); Δ only where our runs' conditions match that row
exactly (`harness.published.matches`), as on the leaderboard.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

import gin
from harness import published, reference

CONDITIONS = ("method", "dataset", "backbone", "pretrain_epochs", "batch_size", "protocol", "metric", "notes", "source")
LAYOUT_JSON = "layout.json"
FIELDS = ("title", "source", "rows", "columns", "reference", "sources", "row_headers", "decimals", "notes", "gpu_hours",
          "eval_gpu_hours")  # fmt: skip
DASH = "—"


class LayoutError(ValueError):
    """A malformed or mismatched layout; the message names the gin file, the key and the fix."""


@dataclass(frozen=True)
class Estimate:
    """Accelerator-hours of one run, on a named device, with where the figure comes from."""

    hours: float
    device: str
    source: str


@dataclass(frozen=True)
class Row:
    method: str
    label: tuple[str, ...]
    where: dict[str, str] = field(default_factory=dict)  # swept key -> value as the sweep records it (a gin literal)
    reference: dict[str, Any] = field(default_factory=dict)
    gpu_hours: Estimate | None = None


@dataclass(frozen=True)
class Column:
    metric: str
    header: str
    reference: dict[str, Any] = field(default_factory=dict)
    ours: bool = True  # False: a column the harness does not measure (printed with the published number only)


def _estimate(value: Any, key: str) -> Estimate:
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[0], (int, float))):
        raise LayoutError(f"{key} = {value!r}: give [hours per run, device, source], e.g. [53, 'V100', 'README ...']")
    hours, device, source = value
    if hours < 0 or not str(device).strip() or not str(source).strip():
        raise LayoutError(
            f"{key} = {value!r}: hours must be >= 0 and device and source non-empty (a published figure's "
            "source, or 'derived: ...' with the derivation)"
        )
    return Estimate(float(hours), str(device), str(source))


def _conditions(value: Any, key: str) -> dict[str, Any]:
    value = dict(value or {})
    if unknown := sorted(set(value) - set(CONDITIONS)):
        raise LayoutError(f"{key}: unknown condition {', '.join(unknown)}; the conditions are {', '.join(CONDITIONS)}")
    return value


@gin.configurable(module="paper")
class Layout:
    """A published table's layout (bound in ``gin/paper/<name>.gin``).

    Args:
        title: the table's name, e.g. ``'MoCo, Table 2(b): VOC07+12 detection, R50-C4'``.
        source: where it was printed: paper, arXiv id and table number, or a repository file at a revision.
        rows: in the printed order: ``(method, label)``, or a dict with ``method``, ``label`` (a string, or
            one string per `row_headers`), ``where`` (swept key -> value: which of the table's settings
            the row shows), ``reference`` (conditions for this row's published numbers, over
            `reference`'s) and ``gpu_hours`` (``[hours per run, device, source]``, over `gpu_hours`'s).
        columns: in the printed order: ``(metric, header)``, or a dict with ``metric``, ``header``,
            ``reference`` (conditions for this column) and ``ours`` (False: the harness does not
            measure it; the cell holds the published number only).
        reference: the conditions every published number was measured under, as
            ``reference/published.csv`` spells them (`CONDITIONS`): a value, a list of accepted values
            in order of preference, or None for any; ``notes`` and ``source`` are substrings.
            Method and metric default to the row's and the column's; protocol to the metric's.
        sources: substrings of ``source`` preferred when several rows match (the paper first, then
            the repositories that quote it); any other matching row comes after them.
        row_headers: the printed headers of the label columns.
        decimals: digits after the point, as the paper prints them.
        notes: lines printed under the table (how the harness's setup differs from the paper's).
        gpu_hours: method -> ``[hours per run, device, source]`` for pretraining.
        eval_gpu_hours: ``[hours per run, device, source]`` of the table's evaluations, every run.
    """

    def __init__(
        self,
        title: str = gin.REQUIRED,
        source: str = gin.REQUIRED,
        rows: Sequence[Any] = gin.REQUIRED,
        columns: Sequence[Any] = gin.REQUIRED,
        reference: Mapping[str, Any] | None = None,
        sources: Sequence[str] = (),
        row_headers: Sequence[str] = ("Method",),
        decimals: int = 1,
        notes: Sequence[str] = (),
        gpu_hours: Mapping[str, Any] | None = None,
        eval_gpu_hours: Any = None,
    ):
        self.title, self.source = str(title), str(source)
        self.row_headers = tuple(str(h) for h in row_headers)
        self.reference = _conditions(reference, "paper.Layout.reference")
        self.sources, self.notes, self.decimals = tuple(sources), tuple(notes), int(decimals)
        self.gpu_hours = {m: _estimate(v, f"paper.Layout.gpu_hours[{m!r}]") for m, v in (gpu_hours or {}).items()}
        self.eval_gpu_hours = _estimate(eval_gpu_hours, "paper.Layout.eval_gpu_hours") if eval_gpu_hours else None
        self.rows = [self._row(i, r) for i, r in enumerate(rows)]
        self.columns = [self._column(j, c) for j, c in enumerate(columns)]
        if not self.rows or not self.columns:
            raise LayoutError("paper.Layout needs at least one row and one column")
        seen: dict[tuple, int] = {}
        for i, row in enumerate(self.rows):
            key = (row.method, tuple(sorted(row.where.items())))
            if key in seen:
                raise LayoutError(
                    f"paper.Layout.rows[{i}] shows the same runs as rows[{seen[key]}] ({row.method}, "
                    f"{row.where or 'no swept setting'}). Fix: drop one, or give each its own 'where'"
                )
            seen[key] = i

    def _row(self, i: int, spec: Any) -> Row:
        key = f"paper.Layout.rows[{i}]"
        if isinstance(spec, (list, tuple)) and len(spec) == 2:
            spec = {"method": spec[0], "label": spec[1]}
        if not isinstance(spec, Mapping) or not {"method", "label"} <= set(spec):
            raise LayoutError(f"{key} = {spec!r}: give (method, label) or a dict with 'method' and 'label'")
        if unknown := sorted(set(spec) - {"method", "label", "where", "where_literal", "reference", "gpu_hours"}):
            raise LayoutError(f"{key}: unknown key {', '.join(unknown)} (a row has method, label, where, reference, "
                              "gpu_hours)")  # fmt: skip
        label = (spec["label"],) if isinstance(spec["label"], str) else tuple(map(str, spec["label"]))
        if len(label) != len(self.row_headers):
            raise LayoutError(
                f"{key}: label {spec['label']!r} has {len(label)} part(s) for {len(self.row_headers)} row header(s) "
                f"{list(self.row_headers)}"
            )
        hours = spec.get("gpu_hours")
        return Row(
            method=str(spec["method"]),
            label=label,
            where={
                **{str(k): repr(v) for k, v in dict(spec.get("where") or {}).items()},
                **{str(k): str(v) for k, v in dict(spec.get("where_literal") or {}).items()},  # layout.json's
            },
            reference=_conditions(spec.get("reference"), f"{key}['reference']"),
            gpu_hours=_estimate(hours, f"{key}['gpu_hours']") if hours is not None else None,
        )

    def _column(self, j: int, spec: Any) -> Column:
        key = f"paper.Layout.columns[{j}]"
        if isinstance(spec, (list, tuple)) and len(spec) == 2:
            spec = {"metric": spec[0], "header": spec[1]}
        if not isinstance(spec, Mapping) or not {"metric", "header"} <= set(spec):
            raise LayoutError(f"{key} = {spec!r}: give (metric, header) or a dict with 'metric' and 'header'")
        if unknown := sorted(set(spec) - {"metric", "header", "reference", "ours"}):
            raise LayoutError(f"{key}: unknown key {', '.join(unknown)} (a column has metric, header, reference, ours)")
        metric = str(spec["metric"])
        if _protocol_of(metric) is None and not _conditions(spec.get("reference"), key).get("protocol"):
            raise LayoutError(
                f"{key}: metric {metric!r} is no harness metric (reference.METRICS: "
                f"{', '.join(reference.METRICS.values())}). Fix: use the metric name run.json records"
            )
        return Column(
            metric, str(spec["header"]), _conditions(spec.get("reference"), key), bool(spec.get("ours", True))
        )

    def estimate(self, row: Row) -> Estimate | None:
        """The row's pretraining estimate: its own, else its method's."""
        return row.gpu_hours or self.gpu_hours.get(row.method)

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "source": self.source,
            "row_headers": list(self.row_headers),
            "rows": [
                {
                    "method": r.method,
                    "label": list(r.label),
                    "where_literal": r.where,
                    "reference": r.reference,
                    **({"gpu_hours": list(asdict(r.gpu_hours).values())} if r.gpu_hours else {}),
                }
                for r in self.rows
            ],
            "columns": [asdict(c) for c in self.columns],
            "reference": self.reference,
            "sources": list(self.sources),
            "decimals": self.decimals,
            "notes": list(self.notes),
            "gpu_hours": {m: list(asdict(e).values()) for m, e in self.gpu_hours.items()},
            "eval_gpu_hours": list(asdict(self.eval_gpu_hours).values()) if self.eval_gpu_hours else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        """The layout `to_dict` wrote (``layout.json``); every field given (none from gin's bindings)."""
        if set(d) != set(FIELDS):
            raise KeyError(
                f"a layout needs exactly the fields {', '.join(FIELDS)}; got {', '.join(sorted(d)) or 'none'}"
            )
        return cls(**d)


def _protocol_of(metric: str) -> str | None:
    """The protocol whose metrics include `metric` (`reference.METRICS`), when exactly one does."""
    hits = [p for p, pattern in reference.METRICS.items() if re.fullmatch(pattern, metric)]
    return hits[0] if len(hits) == 1 else None


def bound(where: str = "the gin files") -> Layout | None:
    """The `Layout` the parsed gin files bind, or None when they bind none (not a paper table).

    Raises:
        LayoutError: the layout is malformed; the message starts with `where` (the files).
    """
    try:
        gin.query_parameter("paper.Layout.rows")
    except ValueError:
        return None
    try:
        return Layout()
    except LayoutError as err:
        raise LayoutError(f"{where}: {str(err).splitlines()[0]}") from err
    except RuntimeError as err:  # gin: a required parameter (title, source, columns) is unbound
        raise LayoutError(f"{where}: paper.Layout: {str(err).splitlines()[0]}. Fix: bind it") from err


def load(path: str | Path) -> Layout:
    """A layout from ``layout.json`` or from a paper table's gin file (parsed alone)."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            return Layout.from_dict(d["layout"] if "layout" in d else d)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LayoutError(
                f"{path}: not a layout.json ({err}). Fix: run the sweep again, or pass the gin file"
            ) from err
    from harness import ginutil

    ginutil.parse([str(path)])
    layout = bound(str(path))
    if layout is None:
        raise LayoutError(f"{path}: binds no paper.Layout. Fix: pass a paper table, e.g. gin/paper/moco_voc07.gin")
    return layout


def metrics_of(protocol: Any) -> list[str] | str:
    """The metric names a protocol object reports: listed where its settings fix them (kNN's ks,
    the semi-supervised percents), else the regular expression of `reference.METRICS`."""
    name = str(getattr(protocol, "name", ""))
    pattern = reference.METRICS.get(name)
    if name == "knn/npid":
        return [f"knn/top1@{k}" for k in protocol.ks]
    if name.startswith("semisup/"):
        return [f"{name}/{p:g}%/top{t}" for p in protocol.percents for t in (1, 5)]
    if pattern and "\\d" not in pattern and "|" not in pattern:
        return sorted({pattern.replace("[15]", "1"), pattern.replace("[15]", "5")})
    return pattern or f"{name}/..."


def check(
    layout: Layout, methods: Sequence[str], swept: Mapping[str, Sequence[str]], evaluations: Sequence[Any], where: str
) -> None:
    """Checks `layout` against its table: every row's method is in the table and its ``where``
    picks one of the table's swept settings, every column's metric is made by one of the
    evaluations.

    Args:
        methods: ``table.Table.methods``.
        swept: swept key -> the values the table runs, as gin literals.
        evaluations: the protocol objects of ``job.run.evaluations``.
        where: the gin files, for the message.
    Raises:
        LayoutError: naming `where`, the layout key and the fix.
    """
    for i, row in enumerate(layout.rows):
        key = f"{where}: paper.Layout.rows[{i}] ({'/'.join(row.label)})"
        if row.method not in methods:
            known = reference.methods()
            what = "is not in table.Table.methods" if row.method in known else "is not a harness method (gin/methods)"
            raise LayoutError(
                f"{key}: method {row.method!r} {what} ({', '.join(methods)}). Fix: add it to table.Table.methods "
                "or correct the row"
            )
        for k, v in row.where.items():
            if k not in swept or v not in swept[k]:
                raise LayoutError(
                    f"{key}: where {k} = {v} is not a setting the table runs (its swept settings: "
                    f"{dict(swept) or 'none'}). Fix: sweep it in table.Table.sweep or .combinations, or correct the row"
                )
        if missing := sorted(set(swept) - set(row.where)):
            raise LayoutError(
                f"{key}: the table sweeps {', '.join(missing)}, and the row does not say which value it shows. "
                "Fix: give the row a 'where' naming each swept key"
            )
    made = {p.name: metrics_of(p) for p in evaluations}

    def made_here(metric: str) -> bool:
        return any(metric in m if isinstance(m, list) else re.fullmatch(m, metric) for m in made.values())

    for j, col in enumerate(layout.columns):
        if col.ours and not made_here(col.metric):
            listed = "; ".join(f"{n}: {', '.join(m) if isinstance(m, list) else m}" for n, m in made.items())
            raise LayoutError(
                f"{where}: paper.Layout.columns[{j}] ({col.header}): metric {col.metric!r} is made by none of "
                f"job.run.evaluations ({listed or 'none'}). Fix: correct the metric, add its protocol to "
                "job.run.evaluations, or mark the column 'ours': False"
            )


def _accepts(value: Any, cell: str, key: str) -> int | None:
    """The preference rank at which a condition `value` accepts a reference `cell`; None: rejected."""
    if value is None:
        return 0
    options = list(value) if isinstance(value, (list, tuple)) else [value]
    for rank, option in enumerate(options):
        if key in ("notes", "source"):
            ok = str(option).lower() in cell.lower()
        elif key in ("pretrain_epochs", "batch_size"):
            ok = (cell == "" and option in ("", None)) or (
                cell != "" and published._epochs(cell) == published._epochs(option)
            )
        else:
            ok = cell == str(option)
        if ok:
            return rank
    return None


def published_for(layout: Layout, row: Row, column: Column, ref: pd.DataFrame) -> tuple[pd.Series | None, pd.DataFrame]:
    """The reference row printed in a cell, and every other reference row that also matched.

    Conditions: the layout's, then the row's, then the column's (later ones win); method and
    metric default to the row's and the column's, protocol to the metric's. Among matches: the
    layout's preferred `sources` first, then the method's standard recipe before a ``variant``,
    then the preference order of list-valued conditions, then file order.
    """
    ref = ref.reset_index(drop=True)  # positions, not labels: a concatenated frame may repeat labels
    cond = {**layout.reference, **row.reference, **column.reference}
    cond.setdefault("method", row.method)
    cond.setdefault("metric", column.metric)
    cond.setdefault("protocol", _protocol_of(str(cond["metric"])))
    ranks = pd.DataFrame(index=ref.index)
    for key, value in cond.items():
        ranks[key] = [_accepts(value, str(cell), key) for cell in ref[key].fillna("").astype(str)]
    ok = ranks.notna().all(axis=1)
    if not ok.any():
        return None, ref.iloc[:0]
    pref = [next((i for i, s in enumerate(layout.sources) if s.lower() in str(src).lower()), len(layout.sources))
            for src in ref.loc[ok, "source"]]  # fmt: skip
    variant = (~published.standard(ref.loc[ok])).to_numpy()
    order = ranks[ok].assign(_source=pref, _variant=variant, _line=range(int(ok.sum())))
    order = order.sort_values(["_source", "_variant", *cond, "_line"], kind="stable")
    hits = ref.loc[order.index]
    return hits.iloc[0], hits.iloc[1:]


def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _ours(board: pd.DataFrame, row: Row, metric: str) -> pd.Series | None:
    """The leaderboard row of `row` (its method at its swept setting), or None when not run."""
    hit = board["method"] == row.method
    for k, v in row.where.items():
        column = f"swept:{k}"
        hit &= board[column].astype(str) == v if column in board else False
    rows = board[hit]
    if rows.empty or f"{metric} mean" not in rows or pd.isna(rows.iloc[0][f"{metric} mean"]):
        return None
    return rows.iloc[0]


def _run_conditions(df: pd.DataFrame, row: Row) -> dict:
    """The recorded conditions of the row's finished runs (the first run's; they share them)."""
    runs = df[(df["method"] == row.method) & (df["status"] == "done")]
    for k, v in row.where.items():
        column = f"swept:{k}"
        runs = runs[runs[column].astype(str) == v] if column in runs else runs.iloc[:0]
    by_run = df.attrs.get("run_conditions") or {}
    return next((by_run[r] for r in runs["run_id"] if by_run.get(r)), {})


def render(layout: Layout, df: pd.DataFrame, board: pd.DataFrame, ref: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """``paper_table.md`` and the frame of ``paper_table.csv``: the layout's rows and columns, each
    cell ``ours (published)``.

    Args:
        df: `harness.collate.load_runs`'s frame (its ``protocol`` column and ``run_conditions``).
        board: `harness.collate.leaderboard`'s frame (means, stds and counts per method and setting).
        ref: checked reference rows (`harness.collate.load_reference`).
    """
    d = layout.decimals
    made_by = df.dropna(subset=["metric", "protocol"]).drop_duplicates("metric").set_index("metric")["protocol"]
    cells, wide, placed, daggers = [], [], [], False
    for row in layout.rows:
        cond = _run_conditions(df, row)
        line, record = list(row.label), dict[str, Any](zip(layout.row_headers, row.label))
        for col in layout.columns:
            ours = _ours(board, row, col.metric) if col.ours else None
            top, others = published_for(layout, row, col, ref)
            mean = float(ours[f"{col.metric} mean"]) if ours is not None else np.nan
            std = float(ours[f"{col.metric} std"]) if ours is not None else np.nan
            n = int(ours[f"{col.metric} n"]) if ours is not None else 0
            pub = float(top["value"]) if top is not None else np.nan
            protocol = made_by.get(col.metric) or _protocol_of(col.metric)
            exact = (
                top is not None
                and ours is not None
                and not published.matches(top.to_frame().T, row.method, col.metric, protocol, cond).empty
            )
            delta = round(mean - pub, 2) if exact else np.nan
            text = "n/a" if not col.ours else DASH if ours is None else _fmt(mean, d)
            if ours is not None and n > 1 and not np.isnan(std):
                text += f" ± {_fmt(std, d)}"
            text += f" ({_fmt(pub, d) if top is not None else DASH})"
            if top is not None and ours is not None and not exact:
                text, daggers = text + "†", True
            line.append(text)
            record |= {col.header: mean, f"{col.header} std": std, f"{col.header} n": n,
                       f"{col.header} published": pub, f"{col.header} Δ": delta}  # fmt: skip
            if top is not None:
                also = sorted({_fmt(float(v), d) for v in others["value"]} - {_fmt(pub, d)})
                placed.append({
                    "row": " / ".join(row.label), "column": col.header, "published": _fmt(pub, d),
                    "Δ": f"{delta:+.{d}f}" if exact else "",
                    "† differs": _differs(top, cond, row.method) if ours is not None and not exact else "",
                    "source": top["source"],
                    "conditions": f"{top['dataset']}, {top['backbone']}, "
                                  f"{top['pretrain_epochs'] + ' ep' if top['pretrain_epochs'] else 'epochs unstated'}"
                                  f"{', batch ' + top['batch_size'] if top['batch_size'] else ''}",
                    "notes": _short(str(top["notes"])),
                    "other matching rows": ", ".join(also),
                })  # fmt: skip
        cells.append(line)
        wide.append(record)
    table = pd.DataFrame(cells, columns=[*layout.row_headers, *(c.header for c in layout.columns)])
    split = [
        f"{c.header}: this table has {c.metric} under more than one protocol setting (leaderboard.md, "
        f"`{c.metric} [<id>]`), so no single number of ours is shown"
        for c in layout.columns
        if c.ours and any(str(k).startswith(f"{c.metric} [") for k in board.columns)
    ]
    md = [
        f"# {layout.title}",
        "",
        f"Each cell: ours, mean ± std over seeds ({DASH}: not run), then the published number in parentheses "
        f"({DASH}: the reference files, reference/published.csv and any --reference, have none under the "
        "layout's conditions)"
        + (". †: our runs' conditions (below) differ from those the published number was measured under, or it is "
           "another recipe of the method (a variant), so it is context, not a reproduction target, and has no Δ"
           if daggers else "")
        + (". n/a: a column the harness does not measure" if any(not c.ours for c in layout.columns) else "")
        + ".",
        "",
        _escape(table).to_markdown(index=False, disable_numparse=True),
        "",
        f"Source: {layout.source}.",
        "",
        *[f"- {note}" for note in [*layout.notes, *split]],
        *([""] if layout.notes or split else []),
    ]  # fmt: skip
    if placed:
        md += ["## Published numbers", "",
               "Each published number above, with the reference row it comes from (Δ = ours - published, only where "
               "our runs were made under that row's conditions).", "",
               _escape(pd.DataFrame(placed)).to_markdown(index=False, disable_numparse=True), ""]  # fmt: skip
    ran = [
        {"row": " / ".join(r.label), "method": r.method, **{k: c.get(k, "") for k in published.CONDITION_KEYS}}
        for r in layout.rows
        if (c := _run_conditions(df, r))
    ]
    if ran:
        md += ["## Our runs' conditions", "",
               _escape(pd.DataFrame(ran).astype(str)).to_markdown(index=False, disable_numparse=True), ""]  # fmt: skip
    return "\n".join(md), pd.DataFrame(wide)


def _differs(top: pd.Series, cond: Mapping[str, Any], method: str) -> str:
    """How the published row's conditions differ from our runs' (why a cell has no Δ)."""
    out = [f"method {top['method']} (ours {method})"] if top["method"] != method else []
    if variant := published.variant_of(top):
        out.append(f"variant {variant} (ours: the standard recipe)")
    for key in ("dataset", "backbone", "pretrain_epochs", "batch_size"):
        theirs, ours = str(top[key]), cond.get(key)
        if key in ("pretrain_epochs", "batch_size"):
            if not theirs:
                out += ["epochs unstated"] if key == "pretrain_epochs" else []
                continue
            same = published._epochs(theirs) == published._epochs(ours)
        else:
            same = theirs == str(ours)
        if not same:
            out.append(f"{key} {theirs} (ours {ours if ours not in (None, '') else 'unrecorded'})")
    return "; ".join(out) or "protocol"


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _escape(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.apply(lambda col: col.astype(str).str.replace("|", r"\|").str.replace("\n", " "))


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 1 or h == 0 else f"{h:.2f}"


def estimate_lines(layout: Layout, specs: Sequence[Any]) -> list[str]:
    """The dry-run's GPU-hours: per layout row, its runs x the per-run estimate (pretraining, plus
    the evaluations' where bound), totals per device, and the source of every figure."""
    groups: dict[int | str, list] = {}
    for spec in specs:
        swept = dict(spec.swept)
        i = next(
            (i for i, r in enumerate(layout.rows) if r.method == spec.method
             and all(swept.get(k) == v for k, v in r.where.items())),
            None,
        )  # fmt: skip
        groups.setdefault(i if i is not None else spec.method, []).append(spec)
    lines = ["estimated GPU-hours (paper.Layout.gpu_hours: per run x runs; [n]: the figure's source below):"]
    totals: dict[str, float] = {}
    notes: list[str] = []
    missing: list[str] = []

    def add(label: str, runs: int, est: Estimate | None) -> None:
        if est is None:
            missing.append(label)
            lines.append(f"  {label:<44} {runs:>4}  no estimate bound (not counted)")
            return
        if est.source not in notes:
            notes.append(est.source)
        totals[est.device] = totals.get(est.device, 0.0) + est.hours * runs
        per, tot = f"{_hours(est.hours)} {est.device}-h", f"{_hours(est.hours * runs)} {est.device}-h"
        lines.append(f"  {label:<44} {runs:>4}  {per:>20}  {tot:>22}  [{notes.index(est.source) + 1}]")

    lines.append(f"  {'row (pretraining)':<44} {'runs':>4}  {'per run':>20}  {'total':>22}")
    for key, runs in groups.items():
        if isinstance(key, int):
            row = layout.rows[key]
            add(f"{' / '.join(row.label)} ({row.method})"[:44], len(runs), layout.estimate(row))
        else:
            add(f"{key} (not in the layout)"[:44], len(runs), layout.gpu_hours.get(key))
    add("evaluations (every run)", len(specs), layout.eval_gpu_hours)
    total = " + ".join(f"{_hours(h)} {device}-h" for device, h in totals.items()) or "0"
    lines.append(f"  total: {total}" + (f" (without {', '.join(missing)}: no estimate)" if missing else ""))
    lines += [f"  [{i}] {source}" for i, source in enumerate(notes, 1)]
    return lines
