"""Check that every number added to reference/published.csv appears in the text of its source.

The text is what a PDF text extractor (e.g. pypdf) gives for the source paper; map each source
(a prefix of the CSV's `source` column) to its text file. The rows checked are those of FILE
that are not in FILE at --since (all rows without it). A row passes when its value, as the CSV
prints it, is a number token of its source's text (not part of a longer number); a row whose
notes say the source printed it otherwise ("printed as 0.842 (fraction)", "printed as error
rate 7.82 %") passes when that printed token is in the text and converts to the value; rows whose
source no --text maps are listed as unchecked and fail the run unless --allow-unmapped.

    python scripts/check_published_text.py --since HEAD~1 \
        --text "Gidaris et al. 2018, RotNet=/tmp/pdfs/rot.txt" \
        --text "Pathak et al. 2016=/tmp/pdfs/ce.txt" -v

-v prints, for every row, the text lines holding its value (read them against the row).
Exit status: 0 all checked rows pass, 1 a value is missing from its text, 2 unmapped rows or bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import subprocess
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1] / "reference" / "published.csv"


def rows_of(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def added_rows(path: Path, since: str | None) -> list[dict[str, str]]:
    """Rows of `path` that the file at git revision `since` does not hold (all rows when `since` is None)."""
    rows = rows_of(path.read_text(encoding="utf-8"))
    if since is None:
        return rows
    top = subprocess.run(["git", "-C", str(path.parent), "rev-parse", "--show-toplevel"],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    rel = path.resolve().relative_to(top).as_posix()
    shown = subprocess.run(["git", "-C", top, "show", f"{since}:{rel}"], capture_output=True, text=True, check=True)
    old = shown.stdout
    seen = {tuple(r.items()) for r in rows_of(old)}
    return [r for r in rows if tuple(r.items()) not in seen]


def value_lines(value: str, lines: list[str]) -> list[str]:
    """The lines of `lines` holding `value` as a whole number token."""
    pattern = re.compile(rf"(?<![\d.]){re.escape(value)}(?![\d])")
    return [line for line in lines if pattern.search(line)]


PRINTED = [  # (notes pattern, the value in percent the printed token converts to)
    (re.compile(r"printed as error rate (\d+(?:\.\d+)?)"), lambda token: 100 - float(token)),
    (re.compile(r"printed as (\d+(?:\.\d+)?) \(fraction\)"), lambda token: 100 * float(token)),
]


def printed(row: dict[str, str]) -> tuple[str, str | None]:
    """The token the source printed for `row` and, when the notes say it was converted and the
    conversion does not give the row's value, why not (else None)."""
    for pattern, convert in PRINTED:
        if m := pattern.search(row["notes"]):
            token = m[1]
            if abs(convert(token) - float(row["value"])) > 1e-6:
                return token, f"notes say printed as {m[0].removeprefix('printed as ')}, which is not {row['value']}"
            return token, None
    return row["value"], None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", type=Path, default=DEFAULT, help="the reference CSV (default: the shipped one)")
    ap.add_argument("--since", help="git revision: check only the rows added since it")
    ap.add_argument("--text", action="append", default=[], metavar="SOURCE_PREFIX=TEXT_FILE",
                    help="a source (prefix of the CSV's source column) and its extracted text; repeatable")  # fmt: skip
    ap.add_argument("--allow-unmapped", action="store_true", help="rows whose source no --text maps do not fail")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the text lines holding each value")
    args = ap.parse_args(argv)
    texts: dict[str, list[str]] = {}
    for spec in args.text:
        prefix, sep, name = spec.partition("=")
        if not sep or not prefix or not Path(name).is_file():
            print(f"error: --text {spec!r}: expected SOURCE_PREFIX=TEXT_FILE with an existing file", file=sys.stderr)
            return 2
        texts[prefix] = [" ".join(line.split()) for line in Path(name).read_text(encoding="utf-8").splitlines()]
    rows = added_rows(args.file, args.since)
    missing, unmapped = 0, []
    for row in rows:
        prefix = max((p for p in texts if row["source"].startswith(p)), key=len, default=None)
        label = f"{row['method']} {row['metric']} {row['value']} ({row['source']})"
        if prefix is None:
            unmapped.append(label)
            continue
        token, mismatch = printed(row)
        if mismatch:
            missing += 1
            print(f"MISMATCH {label}: {mismatch}")
            continue
        found = value_lines(token, texts[prefix])
        if not found:
            missing += 1
            print(f"MISSING  {label}")
        elif args.verbose:
            print(f"ok       {label}")
            for line in found[:3]:
                print(f"           | {line[:160]}")
    for label in unmapped:
        print(f"UNMAPPED {label}")
    checked = len(rows) - len(unmapped)
    print(f"{checked} rows checked, {missing} missing, {len(unmapped)} unmapped")
    if missing:
        return 1
    return 2 if unmapped and not args.allow_unmapped else 0


if __name__ == "__main__":
    sys.exit(main())
