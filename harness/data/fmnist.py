"""Fashion-MNIST (Xiao et al. 2017) from its IDX files: the embedded default dataset.

Looked for in the configured folder, Debian's ``dataset-fashion-mnist`` package, then
``$SSLBENCH_DATA``; else torchvision's download.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import cast

import numpy as np
import torch

import gin
from harness.data.base import CachedSplits, DataError, ImageSet

SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FMNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (LeCun's MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            zero, dtype, ndim = struct.unpack(">HBB", fh.read(4))
            if zero != 0 or dtype != 0x08:
                raise DataError(f"{path}: not an unsigned-byte IDX file (magic {zero:#x}, type {dtype:#x})")
            shape = struct.unpack(f">{ndim}I", fh.read(4 * ndim))
            data = np.frombuffer(fh.read(), dtype=np.uint8)
    except (OSError, EOFError, struct.error) as err:
        raise DataError(f"{path}: unreadable IDX file ({err}); delete it and fetch the data again") from err
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({data.size} bytes of {int(np.prod(shape))}); fetch it again")
    return data.reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidates(root: str | None) -> list[Path]:
    """Where to look, in order: the configured root, the Debian package, $SSLBENCH_DATA."""

    def under(d: str) -> list[Path]:
        return [Path(d), Path(d) / "fashion-mnist", Path(d) / "FashionMNIST" / "raw"]

    env = os.environ.get("SSLBENCH_DATA")
    return [*(under(root) if root else []), *map(Path, SYSTEM_DIRS), *(under(env) if env else [])]


@gin.configurable(module="data")
class FashionMNIST(CachedSplits):
    """Fashion-MNIST, 60k train / 10k test 28x28 grayscale images, 10 classes.

    Args:
        root: a folder holding the IDX files, tried first; then the Debian package's
            folder, then ``$SSLBENCH_DATA``.
        download: fall back to torchvision's download into `root` (or ``data/``).
        pretrain_size: images used for pretraining (a fixed subset of train); None: all.
    """

    name = "fashion_mnist"
    key = "data.FashionMNIST"
    splits = tuple(FMNIST_FILES)

    def __init__(self, root: str | None = None, download: bool = True, pretrain_size: int | None = None):
        self.root, self.download, self.pretrain_size = root, download, pretrain_size

    def _locate(self) -> Path:
        tried = _candidates(self.root)
        for d in tried:
            if all(_find(d, stem) for pair in FMNIST_FILES.values() for stem in pair):
                return d
        if self.download:
            target = Path(self.root or os.environ.get("SSLBENCH_DATA") or "data")
            try:
                import torchvision

                torchvision.datasets.FashionMNIST(str(target), train=True, download=True)
                torchvision.datasets.FashionMNIST(str(target), train=False, download=True)
                return target / "FashionMNIST" / "raw"
            except Exception as err:  # noqa: BLE001 - any download failure ends in the same advice
                tried.append(Path(f"torchvision download into {target} failed: {err}"))
        raise DataError(
            "Fashion-MNIST not found. Looked in:\n  "
            + "\n  ".join(map(str, tried))
            + "\nFix: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four IDX files "
            "(train-images-idx3-ubyte.gz, ...) in a folder and bind `data.FashionMNIST.root = '<folder>'` "
            "or set SSLBENCH_DATA=<folder>."
        )

    def read_split(self, which: str) -> ImageSet:
        """``train`` (60k) or ``test`` (10k), read from the IDX files."""
        folder = self._locate()
        img_file, lbl_file = (_find(folder, s) for s in FMNIST_FILES[which])
        try:
            images, labels = read_idx(cast(Path, img_file)), read_idx(cast(Path, lbl_file))  # _locate found them
        except DataError as err:
            raise DataError(f"{err}, or bind `data.FashionMNIST.root` to a folder holding intact IDX files") from err
        if images.ndim != 3 or len(images) != len(labels):
            raise DataError(
                f"{img_file}: expected [N, 28, 28] images matching {lbl_file} ({images.shape} images, "
                f"{len(labels)} labels). Fix: fetch both files again, or bind `data.FashionMNIST.root` "
                "to a folder holding intact IDX files"
            )
        return ImageSet(
            images=torch.from_numpy(images.copy()).unsqueeze(1),
            labels=torch.from_numpy(labels.astype(np.int64)),
            classes=FMNIST_CLASSES,
            mean=(0.2860,),
            std=(0.3530,),
        )
