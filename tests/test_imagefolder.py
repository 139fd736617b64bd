"""ImageFolder trees (ImageNet's on-disk layout), generated small, and their failures."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import DataError, ImageFolder, read_class_file
from harness.data import main as data_main
from tests.conftest import REPO


def write_tree(
    root, classes=("cat", "dog"), per_class: int = 6, sizes=((40, 30), (24, 50)), splits=("train", "val")
) -> None:
    """A tiny ImageNet-style tree of real JPEG/PNG files with class-coloured content."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = sizes[i % len(sizes)]
                arr = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
                arr[..., c] += 150
                ext = ".jpg" if i % 2 else ".png"
                Image.fromarray(arr).save(root / split / name / f"{i}{ext}")


def test_reads_a_tree_resized_and_centre_cropped(tmp_path):
    write_tree(tmp_path)
    ds = ImageFolder(root=str(tmp_path), load_size=16, pretrain_size=5)
    train = ds.split("train")
    assert train.classes == ["cat", "dog"] and train.labels.tolist() == [0] * 6 + [1] * 6
    batch = train.images[torch.tensor([0, 7])]
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == torch.uint8
    assert batch[0, 0].float().mean() > batch[0, 1].float().mean()  # cat images are red
    assert batch[1, 1].float().mean() > batch[1, 0].float().mean()  # dog images are green
    assert train.images[0:3].shape == (3, 3, 16, 16) and train.channels == 3
    assert len(ds.split("pretrain")) == 5 and len(ds.split("test")) == 12


def test_corrupt_image_stops_with_its_path(tmp_path, capsys):
    write_tree(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    train = ImageFolder(root=str(tmp_path), load_size=16).split("train")
    idx = train.images.paths.index(str(bad))
    with pytest.raises(DataError, match="broken.jpg: cannot decode image.*delete or replace"):
        train.images[torch.tensor([0, idx])]
    assert data_main(["verify", str(tmp_path)]) == 1
    assert "broken.jpg" in capsys.readouterr().out


def test_missing_folder_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="image folder not found: .*data.ImageFolder.root"):
        ImageFolder(root=str(tmp_path / "nope")).split("train")


@pytest.mark.slow
def test_a_run_on_a_corrupt_tree_fails_clearly_and_claims_nothing(tmp_path):
    write_tree(tmp_path / "data", per_class=40)
    (tmp_path / "data" / "train" / "cat" / "zz-broken.png").write_bytes(b"\x89PNG garbage")
    cmd = [
        sys.executable,
        "-m",
        "harness.sweep",
        "gin/table1.gin",
        "gin/scale/smoke.gin",
        "--only",
        "supervised",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "job.run.dataset = @data.ImageFolder()",
        "--bind",
        f"data.ImageFolder.root = '{tmp_path / 'data'}'",
        "--bind",
        "data.ImageFolder.load_size = 32",
        "--bind",
        "data.ImageFolder.pretrain_size = None",
        "--bind",
        "trainer.Trainer.batch_size = 81",
        "--bind",
        "trainer.Trainer.max_steps = 1",
        "--results",
        str(tmp_path / "results"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "zz-broken.png: cannot decode image" in proc.stderr
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("run.json")]
    assert rec["status"] == "failed" and "DataError" in rec["error"] and rec["metrics"] == {}
    assert not list((tmp_path / "results").rglob("encoder.pt"))


# --- one class list for every split -------------------------------------------------------


def test_a_split_missing_a_class_keeps_the_train_labels(tmp_path):
    write_tree(tmp_path, classes=("a", "b"), per_class=2, splits=("train",))
    write_tree(tmp_path, classes=("b",), per_class=3, splits=("val",))
    ds = ImageFolder(root=str(tmp_path), load_size=8)
    test = ds.split("test")
    assert test.classes == ["a", "b"] and test.labels.tolist() == [1, 1, 1]
    assert ds.split("train").labels.tolist() == [0, 0, 1, 1]


def test_a_val_class_unknown_to_train_names_the_folder_and_the_fix(tmp_path):
    write_tree(tmp_path, classes=("a", "b"), per_class=2, splits=("train",))
    write_tree(tmp_path, classes=("a", "c"), per_class=2, splits=("val",))
    ds = ImageFolder(root=str(tmp_path), load_size=8)
    with pytest.raises(DataError) as err:
        ds.split("test")
    msg = str(err.value)
    assert str(tmp_path / "val" / "c") in msg and "'c'" in msg and "add it to train/" in msg
    assert "data.ImageFolder.classes" in msg
    with pytest.raises(DataError, match="class folder 'c'"):
        ImageFolder(root=str(tmp_path), load_size=8).check()


def test_bound_classes_give_the_labels_and_an_unlisted_train_folder_fails(tmp_path):
    write_tree(tmp_path, classes=("a", "b"), per_class=2)
    ds = ImageFolder(root=str(tmp_path), load_size=8, classes=["b", "z", "a"])  # z: no images anywhere, allowed
    assert ds.split("train").classes == ["b", "z", "a"] and ds.split("train").labels.tolist() == [2, 2, 0, 0]
    assert ds.split("test").labels.tolist() == [2, 2, 0, 0]
    with pytest.raises(DataError) as err:
        ImageFolder(root=str(tmp_path), load_size=8, classes=["a"]).split("train")
    msg = str(err.value)
    assert str(tmp_path / "train" / "b") in msg and "'b' is not in `data.ImageFolder.classes`" in msg
    assert "Fix: add it to data.ImageFolder.classes" in msg
    write_tree(tmp_path, classes=("c",), per_class=1, splits=("val",))
    with pytest.raises(DataError, match=r"val/c: class folder 'c'.*Fix: add it to `data.ImageFolder.classes`"):
        ImageFolder(root=str(tmp_path), load_size=8, classes=["a", "b"]).split("test")


# --- verify: a folder that holds no images is an error, not a pass --------------------------


@pytest.mark.parametrize("case", ["missing", "file", "empty"])
def test_verify_on_a_folder_without_images_exits_2_with_one_error_line(tmp_path, capsys, case):
    target = tmp_path / "data"
    if case == "file":
        target.write_text("not a folder")
    elif case == "empty":
        (target / "train" / "cat").mkdir(parents=True)
        (target / "train" / "notes.txt").write_text("no images here")
    assert data_main(["verify", str(target)]) == 2
    out, err = capsys.readouterr()
    assert "every image decodes" not in out + err
    assert err.startswith(f"error: {target}: ") and err.count("\n") == 1 and "Fix: pass the folder" in err
    assert {"missing": "no such folder", "file": "is a file", "empty": "no image files"}[case] in err


def test_verify_counts_the_images_it_checked(tmp_path, capsys):
    write_tree(tmp_path, per_class=3)
    assert data_main(["verify", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path}: every image decodes (12 checked)"


def test_verify_as_a_command_on_a_missing_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "harness.data", "verify", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {tmp_path / 'nope'}: no such folder")
    assert proc.stdout == ""


# --- check: the sweep's preflight ----------------------------------------------------------


def test_check_returns_the_pretraining_count_of_a_good_tree(tmp_path):
    write_tree(tmp_path)
    assert ImageFolder(root=str(tmp_path), load_size=8, pretrain_size=5).check() == 5
    assert ImageFolder(root=str(tmp_path), load_size=8).check() == 12


def test_check_names_the_gin_key_and_the_fix_on_bad_trees(tmp_path):
    with pytest.raises(DataError, match=r"image folder not found: .*nope\. Fix: bind `data.ImageFolder.root`"):
        ImageFolder(root=str(tmp_path / "nope")).check()
    write_tree(tmp_path / "noval", splits=("train",))
    with pytest.raises(DataError) as err:
        ImageFolder(root=str(tmp_path / "noval")).check()
    msg = str(err.value)
    assert str(tmp_path / "noval" / "val") in msg and "`data.ImageFolder.test_dir`" in msg and "'train'" in msg
    write_tree(tmp_path / "emptyval", splits=("train",))
    (tmp_path / "emptyval" / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"emptyval/val: no images found in class subfolders.*Fix: put the images"):
        ImageFolder(root=str(tmp_path / "emptyval")).check()
    write_tree(tmp_path / "flatval", splits=("train",))
    (tmp_path / "flatval" / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flatval" / "val" / "ILSVRC2012_val_00000001.png")
    with pytest.raises(DataError, match=r"1 images lie directly in it\. Fix: sort them into one subfolder per class"):
        ImageFolder(root=str(tmp_path / "flatval")).check()
    write_tree(tmp_path / "lfs", per_class=1)
    (tmp_path / "lfs" / "val" / "cat" / "0.png").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(DataError, match=r"lfs/val/cat/0.png: cannot decode image"):
        ImageFolder(root=str(tmp_path / "lfs"), load_size=8).check()


def test_a_single_class_train_split_warns_and_runs(tmp_path):
    from harness.data import warnings_for

    write_tree(tmp_path, classes=("cat",), per_class=2)
    ds = ImageFolder(root=str(tmp_path), load_size=8)
    assert ds.check() == 2
    (warning,) = warnings_for(ds.split("train"))
    assert "1 class ('cat')" in warning and "trivially 100 %" in warning
    write_tree(tmp_path / "two", per_class=2)
    assert warnings_for(ImageFolder(root=str(tmp_path / "two"), load_size=8).split("train")) == []
    (tmp_path / "three" / "train" / "empty").mkdir(parents=True)
    write_tree(tmp_path / "three", per_class=1)
    (warning,) = warnings_for(ImageFolder(root=str(tmp_path / "three")).split("train"))
    assert "no images of 1 of its 3 classes ('empty')" in warning


# --- a class list from a file, and a larger tree read through it --------------------------


def test_classes_file_gives_the_labels_and_skips_comments(tmp_path):
    write_tree(tmp_path / "data", classes=("a", "b"), per_class=2)
    listing = tmp_path / "classes.txt"
    listing.write_text("# two classes, b first\n\nb\n  a  \n")
    assert read_class_file(listing) == ["b", "a"]
    ds = ImageFolder(root=str(tmp_path / "data"), load_size=8, classes_file=str(listing))
    assert ds.split("train").classes == ["b", "a"] and ds.split("train").labels.tolist() == [1, 1, 0, 0]
    assert read_class_file("gin/scale/imagenet100_classes.txt")[0] == "n02869837"  # relative: the repository's


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, r"class list file not found: .*classes.txt\. Fix: bind `data.ImageFolder.classes_file` to a text file"),
        ("# only a comment\n\n", r"classes.txt: lists no class names\. Fix: bind `data.ImageFolder.classes_file`"),
        (
            "a\nn01440764 tench\n",
            r"classes.txt, line 2: 'n01440764 tench' is not one class folder name\. Fix: one name a line",
        ),
        ("train/a\n", r"classes.txt, line 1: 'train/a' is not one class folder name"),
        ("a\nb\na\n", r"classes.txt, line 3: 'a' is listed twice \(first on line 1\)\. Fix: remove the repeated line"),
    ],
)
def test_a_missing_or_malformed_classes_file_names_the_file_and_the_fix(tmp_path, text, expected):
    listing = tmp_path / "classes.txt"
    if text is not None:
        listing.write_text(text)
    with pytest.raises(DataError, match=expected):
        ImageFolder(root=str(tmp_path), classes_file=str(listing))


def test_classes_and_classes_file_together_or_subset_only_without_a_list_are_refused(tmp_path):
    (tmp_path / "c.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"classes and data.ImageFolder.classes_file .* both bound\. Fix: bind one"):
        ImageFolder(root=str(tmp_path), classes=["a"], classes_file=str(tmp_path / "c.txt"))
    with pytest.raises(ValueError, match=r"subset_only = True reads only the listed classes, but no list is bound"):
        ImageFolder(root=str(tmp_path), subset_only=True)


def test_subset_only_reads_the_listed_classes_of_a_larger_tree(tmp_path):
    write_tree(tmp_path, classes=("a", "b", "c"), per_class=2)
    listing = tmp_path / "two.txt"
    listing.write_text("c\na\n")
    with pytest.raises(DataError) as err:  # without subset_only a larger tree is an error, as before
        ImageFolder(root=str(tmp_path), load_size=8, classes_file=str(listing)).split("train")
    msg = str(err.value)
    assert "'b' is not in `data.ImageFolder.classes_file (" in msg and "data.ImageFolder.subset_only = True" in msg
    ds = ImageFolder(root=str(tmp_path), load_size=8, classes_file=str(listing), subset_only=True)
    train, test = ds.split("train"), ds.split("test")
    assert train.classes == test.classes == ["c", "a"]
    assert train.labels.tolist() == test.labels.tolist() == [1, 1, 0, 0]
    assert not any("/b/" in p for p in train.images.paths + test.images.paths)
    assert ds.check() == 4
    listing.write_text("x\ny\n")  # none of the tree's folders is listed
    with pytest.raises(DataError, match=r"none of its 3 class folders .* is among the 2 listed classes"):
        ImageFolder(root=str(tmp_path), classes_file=str(listing), subset_only=True).split("train")
