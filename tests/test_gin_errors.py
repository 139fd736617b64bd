"""Bad gin files and bindings fail up front through the real CLI: exit 2, file, line, key and fix; no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import sweep

TABLE = "gin/table1.gin"


def run(capsys, *args: str) -> tuple[int, str]:
    rc = sweep.main(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


def fails(capsys, results: Path, *args: str) -> str:
    """Runs the sweep twice; asserts exit 2, one short message, the same both times, no traceback, nothing written."""
    rc, out = run(capsys, *args, "--results", str(results))
    rc2, again = run(capsys, *args, "--results", str(results))
    assert rc == 2 and rc2 == 2, out
    assert out == again
    assert out.startswith("error: ") and "Traceback" not in out and len(out.strip().splitlines()) <= 2, out
    assert not any(results.rglob("run.json"))
    return out


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_files_including_each_other(capsys, tmp_path):
    a, b = tmp_path / "a.gin", tmp_path / "b.gin"
    write(a, f"# a\ninclude '{b}'\n")
    write(b, f'trainer.Trainer.epochs = 2\n\ninclude "{a}"\n')
    out = fails(capsys, tmp_path / "results", TABLE, str(a), "--dry-run")
    assert f"{b}, line 3" in out and f"{a} -> {b} -> {a}" in out and "remove one include" in out


def test_file_including_itself(capsys, tmp_path):
    a = write(tmp_path / "self.gin", f"include '{tmp_path / 'self.gin'}'\n")
    out = fails(capsys, tmp_path / "results", a, "--dry-run")
    assert f"{a}, line 1" in out and "includes the file itself" in out and "Fix: remove the include on line 1" in out


def test_include_of_a_missing_file(capsys, tmp_path):
    top = write(tmp_path / "top.gin", "trainer.Trainer.epochs = 2\ninclude 'gin/scale/no-such-scale.gin'\n")
    out = fails(capsys, tmp_path / "results", TABLE, top, "--dry-run")
    assert f"{top}, line 2" in out and "'gin/scale/no-such-scale.gin': no such file" in out
    assert str(sweep.ginutil.REPO_ROOT / "gin/scale/no-such-scale.gin") in out and "Fix: correct the path" in out
    out = fails(capsys, tmp_path / "results", TABLE, "--dry-run", "--bind", "include 'gin/scale/no-such-scale.gin'")
    assert (
        "--bind \"include 'gin/scale/no-such-scale.gin'\": include 'gin/scale/no-such-scale.gin': no such file" in out
    )


@pytest.mark.parametrize(
    "text, line, bracket",
    [
        ("# epochs\n\ntrainer.Trainer.epochs = [3\n", 3, "'['"),
        ("x = (\n", 1, "'('"),
        ("knn.KNN.ks = (20,\n    200\nknn.KNN.temperature = 0.1\n", 1, "'('"),
    ],
)
def test_unclosed_bracket_in_an_included_file(capsys, tmp_path, text, line, bracket):
    bad = write(tmp_path / "bad.gin", text)
    top = write(tmp_path / "top.gin", f"include '{bad}'\n")
    out = fails(capsys, tmp_path / "results", TABLE, top, "--dry-run")
    assert f"{bad}, line {line}: {bracket} is never closed" in out and "close the bracket" in out
    assert "top.gin" not in out


def test_unclosed_bracket_in_a_binding(capsys, tmp_path):
    out = fails(
        capsys,
        tmp_path / "results",
        TABLE,
        "--dry-run",
        "--bind",
        "knn.KNN.temperature = 0.1",
        "--bind",
        "trainer.Trainer.epochs = (2",
    )
    assert "--bind 'trainer.Trainer.epochs = (2'" in out and "'(' is never closed" in out and "close the bracket" in out


@pytest.mark.parametrize(
    "binding, message",
    [
        (
            "trainer.Trainer.max_steps = 'x'",
            "trainer.Trainer.max_steps = 'x' is a str; it takes int or None (default None)",
        ),
        ("trainer.Trainer.epochs = 'three'", "trainer.Trainer.epochs = 'three' is a str; it takes float (default 1.0)"),
        ("knn.KNN.temperature = [1]", "knn.KNN.temperature = [1] is a list; it takes float (default 0.07)"),
        ("trainer.Trainer.max_steps = True", "trainer.Trainer.max_steps = True is a bool; it takes int or None"),
    ],
)
def test_wrong_type_in_a_file_fails_before_any_run(capsys, tmp_path, binding, message):
    """Not a dry run: nothing is written under --results. Well-typed values of the same keys still pass."""
    ok = write(
        tmp_path / "ok.gin",
        "trainer.Trainer.epochs = 3\ntrainer.Trainer.max_steps = None\nknn.KNN.ks = (5,)\nknn.KNN.temperature = 1\n",
    )
    rc, out = run(capsys, TABLE, ok, "--dry-run", "--only", "pixels", "--results", str(tmp_path / "dry"))
    assert rc == 0, out
    bad = write(tmp_path / "scale.gin", f"# a scale\ntrainer.Trainer.batch_size = 8\n{binding}\n")
    out = fails(capsys, tmp_path / "results", TABLE, bad, "--only", "pixels")
    assert f"{bad}, line 3: {message}" in out and "Fix: give" in out
    assert not (tmp_path / "results").exists()


def test_wrong_type_in_a_binding_and_through_a_macro(capsys, tmp_path):
    out = fails(capsys, tmp_path / "results", TABLE, "--dry-run", "--bind", "knn.KNN.ks = 20")
    assert "--bind 'knn.KNN.ks = 20': knn.KNN.ks = 20 is an int; it takes list or tuple" in out
    out = fails(capsys, tmp_path / "results", TABLE, "--dry-run", "--bind", "IMAGE_SIZE = 'big'")
    assert "IMAGE_SIZE = 'big' is a str" in out and "features.FrozenFeatures.image_size = %IMAGE_SIZE" in out
    assert "gin/base.gin, line" in out and "Fix: give IMAGE_SIZE a value of type int" in out


def test_misaligned_block(capsys, tmp_path):
    bad = write(tmp_path / "block.gin", "trainer.Trainer:\n        epochs = 2\n    batch_size = 8\n")
    out = fails(capsys, tmp_path / "results", TABLE, bad, "--dry-run")
    assert f"{bad}, line 3: unindent does not match" in out and "Fix: indent every binding" in out
