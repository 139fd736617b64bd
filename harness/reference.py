"""Published numbers (``reference/published.csv``): one row per number a paper or a
repository printed, with the conditions it was measured under and its source.

`read` checks every row and raises `ReferenceError` naming the file, the line and the fix:
a known harness method, protocol and metric of that protocol, a value in percent, a source
for every number, and no row twice. ``variant`` is empty for a number of the method's standard
recipe (what ``gin/methods/<name>.gin`` sets) and otherwise names how the recipe differs
(``ablation``, ``v2``, ``no multi-crop``, ...): `harness.published` never computes a Δ against
such a row. ``reference/README.md`` documents the columns.

Usage: ``python -m harness.reference [FILE ...]`` checks files (default: the shipped one).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from harness import ginutil

SHIPPED = ginutil.REPO_ROOT / "reference" / "published.csv"
COLUMNS = ["method", "dataset", "backbone", "pretrain_epochs", "batch_size", "protocol", "metric", "value", "spread",
           "source", "notes", "variant"]  # fmt: skip
# A file written before the `variant` column (a user's own numbers): every row is the method's standard recipe.
LEGACY_COLUMNS = COLUMNS[:-1]
DATASETS = ("imagenet", "imagenet100", "cifar10", "cifar100", "imagenette", "fashion_mnist")
# protocol -> the metric names it reports (harness/evals/*)
METRICS = {
    "knn/npid": r"knn/top1@\d+",
    "linear/fast": r"linear/top[15]",
    "linear/goyal19": r"linear/goyal19/top[15]",
    "linear/mocov2": r"linear/mocov2/top[15]",
    "linear/mae": r"linear/mae/top[15]",
    "semisup/simclr": r"semisup/simclr/\d+%/top[15]",
    "semisup/mae": r"semisup/mae/\d+%/top[15]",
    "lowshot/logreg": r"lowshot/logreg/k\d+/top1",
    "retrieval/cosine": r"retrieval/cosine/(R@\d+|mAP)",
    "svm/voc07": r"svm/voc07/mAP",
    "detection/voc07": r"detection/voc07/(AP50|AP75|AP)",
    "zeroshot/clip": r"zeroshot/top1",
}
KEY = [c for c in COLUMNS if c not in ("value", "spread")]  # a variant (e.g. multi-crop) differs in notes or variant


class ReferenceError(ValueError):
    """A malformed reference file; the message names the file, the line and the fix."""


def methods() -> set[str]:
    """The harness's method names (``gin/methods/<name>.gin``; not the `external` pseudo-method)."""
    return {p.stem for p in (ginutil.REPO_ROOT / "gin" / "methods").glob("*.gin")} - {"external"}


def _row_problems(row: dict[str, str], known: set[str]) -> list[str]:
    problems = []
    if row["method"] not in known:
        problems.append(f"method {row['method']!r} is not a harness method (gin/methods/<name>.gin)")
    if row["dataset"] not in DATASETS:
        problems.append(f"dataset {row['dataset']!r} is not one of {', '.join(DATASETS)}")
    pattern = METRICS.get(row["protocol"])
    if pattern is None:
        problems.append(f"protocol {row['protocol']!r} is not one of {', '.join(METRICS)}")
    elif not re.fullmatch(pattern, row["metric"]):
        problems.append(f"metric {row['metric']!r} is not a metric of {row['protocol']} ({pattern})")
    for key in ("pretrain_epochs", "batch_size"):
        if row[key] and not (row[key].isdigit() and int(row[key]) > 0):
            problems.append(f"{key} {row[key]!r} must be a positive integer or empty")
    for key, empty_ok in (("value", False), ("spread", True)):
        try:
            number = float(row[key]) if row[key] or not empty_ok else 0.0
        except ValueError:
            number = float("nan")
        if not 0 <= number <= 100:
            problems.append(f"{key} {row[key]!r} must be a number in [0, 100] (percent)")
    if not row["source"].strip():
        problems.append("source is empty: every number needs its paper and table, or a repository file@revision")
    return problems


def read(path: str | Path) -> pd.DataFrame:
    """The checked rows of one reference CSV (value and spread as floats).

    Raises:
        ReferenceError: the file is missing, its header is neither `COLUMNS` nor `LEGACY_COLUMNS`, or a row
            is malformed or repeated.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            lines = [(reader.line_num, line) for line in reader if line]
    except OSError as err:
        raise ReferenceError(f"{path}: cannot read it ({err})") from err
    if header not in (COLUMNS, LEGACY_COLUMNS):
        raise ReferenceError(
            f"{path}:1: the header must be exactly {','.join(COLUMNS)} (or without the last column, variant); "
            f"got {','.join(header)}"
        )
    known, rows = methods(), []
    seen: dict[tuple[str, ...], int] = {}  # key -> line
    for number, line in lines:
        if len(line) != len(header):
            raise ReferenceError(f"{path}:{number}: {len(line)} fields, expected {len(header)} (quote commas)")
        row = dict(zip(COLUMNS, [cell.strip() for cell in line] + [""] * (len(COLUMNS) - len(header))))
        problems = _row_problems(row, known)
        if problems:
            raise ReferenceError(f"{path}:{number}: " + "; ".join(problems))
        key = tuple(row[k] for k in KEY)
        if key in seen:
            raise ReferenceError(
                f"{path}:{number}: repeats line {seen[key]} (same conditions, metric, source and notes)"
            )
        seen[key] = number
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["value"] = pd.to_numeric(df["value"])
    df["spread"] = pd.to_numeric(df["spread"].replace("", None))
    return df


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.reference", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, default=[SHIPPED], help="reference CSVs (default: the shipped one)")
    args = ap.parse_args(argv)
    for path in args.files:
        try:
            df = read(path)
        except ReferenceError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{path}: {len(df)} rows, {df['method'].nunique()} methods, {df['source'].nunique()} sources")
    return 0


if __name__ == "__main__":
    sys.exit(main())
