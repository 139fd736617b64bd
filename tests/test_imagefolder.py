"""ImageFolder trees (ImageNet's on-disk layout), generated small, and their failures."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import DataError, ImageFolder, main as data_main
from tests.conftest import REPO


def write_tree(root, classes=("cat", "dog"), per_class: int = 6, sizes=((40, 30), (24, 50))) -> None:
    """A tiny ImageNet-style tree of real JPEG/PNG files with class-coloured content."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
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
    cmd = [sys.executable, "-m", "harness.sweep", "gin/table1.gin", "gin/scale/smoke.gin", "--only", "supervised",
           "--bind", "table.Table.seeds = [0]", "--bind", "job.run.dataset = @data.ImageFolder()",
           "--bind", f"data.ImageFolder.root = '{tmp_path / 'data'}'", "--bind", "data.ImageFolder.load_size = 32",
           "--bind", "data.ImageFolder.pretrain_size = None", "--bind", "trainer.Trainer.batch_size = 81",
           "--bind", "trainer.Trainer.max_steps = 1", "--results", str(tmp_path / "results")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "zz-broken.png: cannot decode image" in proc.stderr
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("run.json")]
    assert rec["status"] == "failed" and "DataError" in rec["error"] and rec["metrics"] == {}
    assert not list((tmp_path / "results").rglob("encoder.pt"))
