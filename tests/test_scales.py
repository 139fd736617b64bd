"""The ImageNet and ImageNet-100 scale files (issue 14): what a table plans at each (backbone,
image size, budget, per-method overrides), ImageNet-100's shipped class list read out of a
full ImageNet-format tree, and a root without its splits stopping the sweep before anything
is written. No ImageNet here: the trees are a few generated JPEGs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import ginutil, sweep
from harness.data import read_class_file

LIST = Path(ginutil.GIN_ROOT / "scale" / "imagenet100_classes.txt")
# Two wnids of ImageNet-1k outside ImageNet-100 (tench, goldfish).
UNLISTED = ["n01440764", "n01443537"]


def dry(capsys, tmp_path: Path, scale: str, methods: list[str], *explain: str, table: str = "gin/table1.gin"):
    args = [table, "--dry-run", "--results", str(tmp_path / "results"), "--bind", f"table.Table.scale = '{scale}'",
            "--bind", f"table.Table.methods = {methods!r}", "--bind", "table.Table.seeds = [0]"]  # fmt: skip
    for key in explain:
        args += ["--explain", key]
    rc = sweep.main(args)
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert not (tmp_path / "results").exists()  # a dry run writes nothing
    return out.out


def explained(out: str, method: str) -> dict[str, str]:
    """``{key: "value   (set by ...)"}`` from the --explain lines under one run's row."""
    lines = out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.split(" ", 1)[0] == method)
    got = {}
    for line in lines[row + 1 :]:
        if not line.startswith("    "):
            break
        key, _, value = line.strip().partition(" = ")
        got[key] = value
    return got


def test_the_imagenet_scale_plans_resnet50_at_224_for_200_epochs_and_vits_for_mae_and_clip(capsys, tmp_path):
    keys = ["backbone.create.name", "vit/backbone.create.name", "IMAGE_SIZE", "trainer.Trainer.epochs",
            "trainer.Trainer.batch_size", "job.run.dataset", "data.ImageFolder.root", "swav.SwAV.queue_length"]  # fmt: skip
    out = dry(capsys, tmp_path, "imagenet", ["simclr", "swav", "mae", "clip"], *keys)
    simclr, swav, mae, clip = (explained(out, m) for m in ("simclr", "swav", "mae", "clip"))
    assert simclr["backbone.create.name"].startswith("'resnet50'   (set by gin/scale/imagenet.gin")
    assert simclr["IMAGE_SIZE"].startswith("224   (set by gin/scale/imagenet.gin")
    assert simclr["trainer.Trainer.epochs"].startswith("200   (set by gin/scale/imagenet.gin")
    assert "overrides gin/methods/simclr.gin" in simclr["trainer.Trainer.batch_size"]
    assert simclr["trainer.Trainer.batch_size"].startswith("256 ")
    assert simclr["job.run.dataset"].startswith("@data.ImageFolder()")
    assert simclr["data.ImageFolder.root"].startswith("'data/imagenet'")
    assert swav["swav.SwAV.queue_length"].startswith("3840   (set by gin/scale/imagenet/swav.gin")
    assert mae["vit/backbone.create.name"].startswith("'vit_base_patch16_224'   (set by gin/methods/mae.gin")
    assert clip["backbone.create.name"].startswith("'vit_base_patch16_224'   (set by gin/scale/imagenet/clip.gin")
    assert clip["job.run.dataset"].startswith("@data.Captioned()   (set by gin/scale/imagenet/clip.gin")


def test_the_imagenet100_scale_plans_resnet18_at_224_for_400_epochs_through_the_class_list(capsys, tmp_path):
    keys = ["backbone.create.name", "IMAGE_SIZE", "trainer.Trainer.epochs", "trainer.Trainer.batch_size",
            "data.ImageFolder.classes_file", "data.ImageFolder.subset_only"]  # fmt: skip
    got = explained(dry(capsys, tmp_path, "imagenet100", ["byol"], *keys), "byol")
    assert got["backbone.create.name"].startswith("'resnet18'   (set by gin/scale/imagenet100.gin")
    assert got["IMAGE_SIZE"].startswith("224 ") and got["trainer.Trainer.epochs"].startswith("400 ")
    assert got["trainer.Trainer.batch_size"].startswith("256 ")
    assert got["data.ImageFolder.classes_file"].startswith("'gin/scale/imagenet100_classes.txt'")
    assert got["data.ImageFolder.subset_only"].startswith("True")


def test_the_protocols_data_file_sets_simclrs_subsets_after_the_protocol_files(capsys, tmp_path):
    """semisup_simclr.gin binds subset_files = None after the scale; gin/protocols/imagenet.gin, given
    after it, restores SimCLR's lists; the VOC roots need no such care (no protocol file binds them)."""
    key = "semisup_simclr/semisup.SemiSupervised.subset_files"
    table = "gin/table_finetune.gin"
    plain = explained(dry(capsys, tmp_path, "imagenet", ["simclr"], key, table=table), "simclr")
    assert plain[key].startswith("None   (set by gin/protocols/semisup_simclr.gin")
    rc = sweep.main([table, "gin/protocols/imagenet.gin", "--dry-run", "--results", str(tmp_path / "results"),
                     "--bind", "table.Table.scale = 'imagenet'", "--only", "simclr", "--explain", key,
                     "--explain", "voc.VOC07SVM.root"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "protocol budgets: need the data" in out, out  # Fashion-MNIST has no file names to match
    got = explained(out, "simclr")
    assert got[key].startswith(
        "['data/imagenet_subsets/1percent.txt', 'data/imagenet_subsets/10percent.txt']   (set by gin/protocols/imagenet.gin"
    )
    assert got["voc.VOC07SVM.root"].startswith("'data/VOCdevkit'   (set by gin/protocols/imagenet.gin")


def test_the_shipped_imagenet100_list_is_cmcs_100_distinct_wnids():
    ids = read_class_file(LIST)
    assert len(ids) == 100 == len(set(ids)) and all(re.fullmatch(r"n\d{8}", i) for i in ids)
    assert ids[:3] == ["n02869837", "n01749939", "n02488291"] and ids[-1] == "n02090622"  # CMC's order
    assert not set(UNLISTED) & set(ids)
    assert "HobbitLong/CMC imagenet100.txt@7b227be" in LIST.read_text()


def write_imagenet_tree(root: Path, wnids: list[str], per_class: int = 2) -> None:
    """ImageNet's layout: train/<wnid>/<wnid>_<i>.JPEG and val/<wnid>/ILSVRC2012_val_<k>.JPEG."""
    rng = np.random.default_rng(0)
    k = 0
    for wnid in wnids:
        for split in ("train", "val"):
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                k += 1
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{k:08d}.JPEG"
                Image.fromarray(rng.integers(0, 255, (20, 28, 3)).astype(np.uint8)).save(root / split / wnid / name)


def test_a_full_imagenet_tree_is_read_through_the_100_class_list(tmp_path):
    ids = read_class_file(LIST)
    listed = [ids[5], ids[0], ids[99]]
    write_imagenet_tree(tmp_path / "imagenet", [*listed, *UNLISTED])
    files = ginutil.run_files("simclr", "imagenet100")
    ginutil.parse(files, [f"data.ImageFolder.root = '{tmp_path / 'imagenet'}'", "data.ImageFolder.load_size = 16"])
    data = ginutil.reference("job.run.dataset")
    assert data.check() == 6  # the three listed classes' train images; the unlisted folders are left out
    for which in ("train", "test"):
        split = data.split(which)
        assert split.classes == ids  # labels are positions in the list, in every split
        assert sorted(set(split.labels.tolist())) == [0, 5, 99] and len(split) == 6
        assert not any(u in p for p in split.images.paths for u in UNLISTED)
        assert split.images[0:2].shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    "held, expected",
    [
        ([], r"image folder not found: {root}\. Fix: bind `data.ImageFolder.root` to a folder holding train/ and val/"),
        (
            ["val"],
            r"image folder not found: {root}/train \(the train split; .* holds 'val'\)\. Fix: bind `data.ImageFolder.train_dir`",
        ),
        (
            ["train"],
            r"image folder not found: {root}/val \(the test split; .* holds 'train'\)\. Fix: bind `data.ImageFolder.test_dir`",
        ),
    ],
)
def test_an_imagenet_root_without_its_splits_stops_the_sweep_before_anything_is_written(
    capsys, tmp_path, held, expected
):
    root = tmp_path / "imagenet"
    if held:
        write_imagenet_tree(root, ["n01440764"])
        for split in {"train", "val"} - set(held):
            for f in (root / split / "n01440764").iterdir():
                f.unlink()
            (root / split / "n01440764").rmdir()
            (root / split).rmdir()
    rc = sweep.main(["gin/table1.gin", "--only", "supervised", "--results", str(tmp_path / "results"),
                     "--bind", "table.Table.scale = 'imagenet'", "--bind", "table.Table.seeds = [0]",
                     "--bind", f"data.ImageFolder.root = '{root}'"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and re.search(expected.format(root=re.escape(str(root))), err), err
    assert err.startswith("error: ") and not (tmp_path / "results").exists()


@pytest.mark.parametrize("scale, name", [("imagenet", "imagenet"), ("imagenet100", "imagenet100")])
def test_runs_at_the_imagenet_scales_record_the_dataset_published_numbers_name(scale, name):
    from harness import reference

    ginutil.parse(ginutil.run_files("simclr", scale), [])
    dataset = ginutil.reference("job.run.dataset")
    assert dataset.name == name and name in reference.DATASETS


@pytest.mark.parametrize("missing", ["voc", "subsets"])
def test_a_protocols_missing_data_stops_the_sweep_before_pretraining(capsys, tmp_path, missing):
    """The ImageNet scale's protocols read real VOC and SimCLR's subset files: found missing only at
    evaluation, a run would fail after days of pretraining; the preflight stops it first."""
    root = tmp_path / "imagenet"
    write_imagenet_tree(root, ["n01440764", "n01443537"])
    binds = ["table.Table.seeds = [0]", f"data.ImageFolder.root = '{root}'"]
    if missing == "voc":  # Goyal's VOC07 SVM table: data/VOCdevkit is not there
        table, method, expected = "gin/paper/goyal19_voc07.gin", "supervised", r"voc.VOC07SVM.root = 'data/VOCdevkit'"
    else:  # SimCLR's semi-supervised table: data/imagenet_subsets is not there
        table, method, expected = "gin/paper/simclr_semisup.gin", "simclr", r"subset file not found: data/imagenet_sub"
    args = [table, "--only", method, "--results", str(tmp_path / "results")]
    rc = sweep.main(args + [a for b in binds for a in ("--bind", b)])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(expected, err), err
    assert not (tmp_path / "results").exists()


def test_gin_files_may_follow_options_on_the_sweep_command_line(capsys, tmp_path):
    """The scale headers' commands put the launcher after --bind, as readers type them."""
    rc = sweep.main(["gin/table1.gin", "--bind", "table.Table.scale = 'imagenet'", "gin/launch/local.gin",
                     "--only", "simclr", "--dry-run", "--results", str(tmp_path / "r")])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "simclr" in out and not (tmp_path / "r").exists()
