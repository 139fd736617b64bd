"""Fashion-MNIST loading from real IDX files, and its errors."""
import gzip
import struct

import numpy as np
import pytest
import torch

from harness.data import DataError, FashionMNIST, read_idx
from tests.conftest import fmnist_available


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    """Writes an unsigned-byte IDX file (the format of LeCun's MNIST files)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def write_fake_fmnist(folder, n_train: int = 120, n_test: int = 40, seed: int = 0) -> None:
    """Small Fashion-MNIST-format files: learnable class-dependent images."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, y in enumerate(labels):
            images[i, 2 * y:2 * y + 8, 4:24] += 180  # a bright band whose height encodes the class
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)


def test_reads_idx_files_gzipped_or_not(tmp_path):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "b", arr, compress=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    assert np.array_equal(read_idx(tmp_path / "b"), arr)


def test_truncated_file_names_the_file(tmp_path):
    arr = np.zeros((4, 28, 28))
    write_idx(tmp_path / "x", arr, compress=False)
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-10])
    with pytest.raises(DataError, match="x: truncated"):
        read_idx(tmp_path / "x")


def test_configured_root_is_read(tmp_path):
    write_fake_fmnist(tmp_path)
    ds = FashionMNIST(root=str(tmp_path), download=False, pretrain_size=50)
    train = ds.split("train")
    assert train.images.shape == (120, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert len(ds.split("test")) == 40 and len(ds.split("pretrain")) == 50


def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.data.SYSTEM_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(DataError) as err:
        FashionMNIST(root=str(tmp_path / "empty"), download=False).split("train")
    msg = str(err.value)
    assert str(tmp_path / "empty") in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "data.FashionMNIST.root" in msg


@pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST IDX files absent (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_files():
    ds = FashionMNIST(download=False)
    train, test = ds.split("train"), ds.split("test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert abs(train.images.float().mean().item() / 255 - train.mean[0]) < 1e-3
