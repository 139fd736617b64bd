"""The published-numbers file (reference/published.csv, issue 15): the shipped rows pass the
schema, and each kind of malformed row is an error that names the file and the line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import reference

HEADER = ",".join(reference.COLUMNS)
GOOD = 'simclr,imagenet,resnet50,1000,4096,linear/mocov2,linear/mocov2/top1,69.3,,"Chen et al. 2020, Table 6",,'


def write(tmp_path: Path, *rows: str, header: str = HEADER) -> Path:
    path = tmp_path / "ref.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_the_shipped_file_passes_its_schema():
    df = reference.read(reference.SHIPPED)
    assert len(df) >= 50
    assert set(df["method"]) <= reference.methods() and df["source"].str.len().min() > 0
    assert df["value"].between(0, 100).all()


def test_a_good_row_reads_with_numbers(tmp_path):
    df = reference.read(write(tmp_path, GOOD))
    assert df.loc[0, "value"] == 69.3 and df.loc[0, "pretrain_epochs"] == "1000" and df["spread"].isna().all()


@pytest.mark.parametrize(
    "row,message",
    [
        (GOOD.replace("simclr,", "simclr2,", 1), "method 'simclr2' is not a harness method"),
        (GOOD.replace("imagenet,", "imagenet1k,", 1), "dataset 'imagenet1k' is not one of"),
        (GOOD.replace("linear/mocov2,linear", "linear/sgd,linear"), "protocol 'linear/sgd' is not one of"),
        (GOOD.replace("linear/mocov2/top1", "linear/top1"), "metric 'linear/top1' is not a metric of linear/mocov2"),
        (GOOD.replace(",69.3,", ",693,"), "value '693' must be a number in [0, 100]"),
        (GOOD.replace(",69.3,", ",n/a,"), "value 'n/a' must be a number"),
        (GOOD.replace(",69.3,,", ",69.3,-1,"), "spread '-1' must be a number"),
        (GOOD.replace('"Chen et al. 2020, Table 6"', ""), "source is empty"),
        (GOOD.replace(",1000,", ",1k,"), "pretrain_epochs '1k' must be a positive integer"),
        (GOOD.replace('"Chen et al. 2020, Table 6"', "Chen et al. 2020, Table 6"), "fields, expected 12"),
    ],
)
def test_a_malformed_row_names_the_file_and_line(tmp_path, row, message):
    path = write(tmp_path, GOOD.replace("69.3", "70.1").replace("1000", "800"), row)
    with pytest.raises(reference.ReferenceError, match=rf"^{path}:3: .*{re.escape(message)}"):
        reference.read(path)


def test_a_variant_of_a_row_is_another_row(tmp_path):
    df = reference.read(write(tmp_path, GOOD, GOOD.replace("69.3", "71.0").removesuffix(",") + ",v2"))
    assert list(df["variant"]) == ["", "v2"]


def test_a_repeated_row_and_a_wrong_header_are_errors(tmp_path):
    with pytest.raises(reference.ReferenceError, match=r"ref.csv:3: repeats line 2"):
        reference.read(write(tmp_path, GOOD, GOOD.replace("69.3", "70.0")))
    with pytest.raises(reference.ReferenceError, match=r"ref.csv:1: the header must be exactly"):
        reference.read(write(tmp_path, GOOD, header=HEADER.replace("notes", "note")))


def test_the_checker_exits_2_on_a_bad_file_and_0_on_a_good_one(tmp_path, capsys):
    assert reference.main([str(write(tmp_path, GOOD))]) == 0
    assert "1 rows, 1 methods, 1 sources" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "\n" + GOOD.replace("simclr,", "nope,", 1) + "\n")
    assert reference.main([str(bad)]) == 2
    assert f"{bad}:2: method 'nope'" in capsys.readouterr().err
