"""CIFAR-10/100 in torchvision's on-disk format (issue 14): small pickled batches written the
way the real files are (byte keys, an [N, 3072] uint8 array of R, G and B planes), read back
pixel for pixel; missing and tampered files are errors that name the file; the CIFAR-10
scale file plans a table on them."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from harness import ginutil, job, sweep
from harness.data import CIFAR10, CIFAR100, DataError, read_batch
from harness.trainer import Trainer
from tests.conftest import parse_method

CLASSES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)


def write_cifar10(root: Path, per_batch: int = 6) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        data, labels = _images(per_batch, i)
        record = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data,
                  b"filenames": [f"{name}_{j}.png".encode() for j in range(per_batch)]}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(record, protocol=2))
        written[name] = (data, labels)
    meta = {b"label_names": [c.encode() for c in CLASSES10], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def test_cifar10_reads_every_batch_pixel_for_pixel(tmp_path):
    written = write_cifar10(tmp_path)
    data = CIFAR10(root=str(tmp_path))
    train, test = data.split("train"), data.split("test")
    assert train.images.shape == (30, 3, 32, 32) and len(test) == 6 and train.classes == CLASSES10
    first, labels = written["data_batch_1"]
    assert train.images[0, 1, 2, 3].item() == first[0, 1024 + 2 * 32 + 3]  # green plane, row 2, column 3
    assert train.labels[:6].tolist() == labels.tolist()
    x = train.images.float() / 255
    assert train.mean == pytest.approx(tuple(x.mean((0, 2, 3)).tolist()), abs=1e-4)
    assert test.mean == train.mean and data.split("pretrain").images.shape[1] == 3  # colour


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, seed in (("train", 0), ("test", 1)):
        data, _ = _images(4, seed)
        record = {b"data": data, b"fine_labels": [0, 99, 5, 7], b"coarse_labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(record, protocol=2))
    names = [f"c{i}".encode() for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names, b"coarse_label_names": []}))
    train = CIFAR100(root=str(tmp_path)).split("train")
    assert train.labels.tolist() == [0, 99, 5, 7] and len(train.classes) == 100


def test_missing_files_name_the_folder_and_the_fix(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3.*data.CIFAR10.root.*download = True"):
        CIFAR10(root=str(tmp_path)).split("train")


def test_a_tampered_batch_runs_no_code_and_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match=r"test_batch: not a readable CIFAR batch"):
        read_batch(bad)
    assert not marker.exists()


def test_the_cifar10_scale_plans_a_table_on_those_files(tmp_path, capsys):
    write_cifar10(tmp_path / "data")
    rc = sweep.main(
        [
            "gin/table1.gin",
            "--dry-run",
            "--only",
            "simclr,rotnet",
            "--results",
            str(tmp_path / "results"),
            "--bind",
            "table.Table.scale = 'cifar10'",
            "--bind",
            f"data.CIFAR10.root = '{tmp_path / 'data'}'",
            "--explain",
            "backbone.create.small_input",
            "--explain",
            "job.run.dataset",
        ]  # fmt: skip
    )
    out = capsys.readouterr().out
    assert rc == 0 and "backbone.create.small_input = True   (set by gin/scale/cifar10.gin" in out, out
    assert "job.run.dataset = @data.CIFAR10()" in out


def test_a_colour_method_trains_on_cifar10(tmp_path):
    """Colorization refuses Fashion-MNIST; on CIFAR-10's colour images it trains."""
    write_cifar10(tmp_path / "data", per_batch=8)
    parse_method("colorization", f"data.CIFAR10.root = '{tmp_path / 'data'}'")
    data = CIFAR10(root=str(tmp_path / "data")).split("pretrain")
    method, views = job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, 0)
    Trainer(max_steps=2, batch_size=8, progress=False).fit(method, data, views, tmp_path / "run", seed=0)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
