"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from torchvision's on-disk format.

The "python version" of the datasets (``cifar-10-batches-py/``: ``data_batch_1`` ... ``_5``,
``test_batch``, ``batches.meta``; ``cifar-100-python/``: ``train``, ``test``, ``meta``), each a
pickled dict whose ``data`` is a uint8 ``[N, 3072]`` array (the red, green and blue 32 x 32
planes of each image in turn) beside its labels. torchvision's ``datasets.CIFAR10(root,
download=True)`` writes exactly this; with ``download = True`` this reader calls it when
the files are missing (a machine with internet; never the tests, which write small files of
the same format). The pickles are read by an unpickler that admits only the numpy types the
format holds, so a tampered file cannot run code.

Mean and std are computed from the training images (CIFAR-10: 0.4914, 0.4822, 0.4465 and
0.2470, 0.2435, 0.2616).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gin
from harness.data.base import CachedSplits, DataError, ImageSet

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of the CIFAR format")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict[str, Any]:
    """One pickled CIFAR batch as a dict with str keys; `DataError` naming the file if it is not one."""
    try:
        raw = _NumpyOnly(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: not a readable CIFAR batch ({err}). Fix: download the dataset again") from err
    if not isinstance(raw, dict):
        raise DataError(f"{path}: not a CIFAR batch (a {type(raw).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


class _Cifar(CachedSplits):
    """What CIFAR-10 and -100 share: the folder, the files of each split, the label key."""

    folder: str = ""
    files: dict[str, tuple[str, ...]] = {}
    meta: tuple[str, str] = ("", "")  # file, key of the class names
    label_key: str = "labels"
    torchvision_name: str = ""

    def __init__(self, root: str = "data", download: bool = False, pretrain_size: int | None = None):
        self.root, self.download, self.pretrain_size = root, download, pretrain_size

    def _locate(self) -> Path:
        folder = Path(self.root) / self.folder
        needed = [folder / f for names in self.files.values() for f in names] + [folder / self.meta[0]]
        if all(p.is_file() for p in needed):
            return folder
        if self.download:
            import torchvision

            getattr(torchvision.datasets, self.torchvision_name)(self.root, train=True, download=True)
            return folder
        missing = [str(p) for p in needed if not p.is_file()]
        raise DataError(
            f"{self.key}: {len(missing)} file(s) of torchvision's format missing under {folder} (e.g. {missing[0]}). "
            f"Fix: bind `{self.key}.root` to the folder holding {self.folder}/, or on a machine with internet "
            f"bind `{self.key}.download = True` once (torchvision.datasets.{self.torchvision_name})"
        )

    def read_split(self, which: str) -> ImageSet:
        """``train`` (50k) or ``test`` (10k)."""
        folder = self._locate()
        parts = [read_batch(folder / name) for name in self.files[which]]
        try:
            data = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts])
            labels = np.concatenate([np.asarray(p[self.label_key], dtype=np.int64) for p in parts])
            names = read_batch(folder / self.meta[0])[self.meta[1]]
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
        except KeyError as err:
            raise DataError(f"{self.key}: a file under {folder} lacks the key {err} of the CIFAR format") from err
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise DataError(
                f"{self.key}: {which} under {folder} holds data {data.shape} and {len(labels)} labels; the format "
                "is [N, 3072] uint8 with one label per row. Fix: download the dataset again"
            )
        if labels.min() < 0 or labels.max() >= len(classes):
            raise DataError(f"{self.key}: {which} has labels outside 0..{len(classes) - 1} ({folder})")
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # [N, 3, 32, 32]
        mean, std = self._stats(images if which == "train" else self.split("train").images)
        return ImageSet(images=images, labels=torch.from_numpy(labels), classes=classes, mean=mean, std=std)

    @staticmethod
    def _stats(images: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
        x = images.float().div_(255)  # [N, 3, 32, 32]
        mean = x.mean((0, 2, 3))
        std = x.sub_(mean[None, :, None, None]).pow_(2).mean((0, 2, 3)).sqrt()
        return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


@gin.configurable(module="data")
class CIFAR10(_Cifar):
    """CIFAR-10: 50k train / 10k test 32x32 colour images, 10 classes (torchvision's files).

    Args:
        root: the folder holding ``cifar-10-batches-py/``.
        download: fetch it with torchvision when missing (never in tests).
        pretrain_size: images used for pretraining (a fixed subset of train); None: all.
    """

    name = "cifar10"
    key = "data.CIFAR10"
    folder = "cifar-10-batches-py"
    files = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
    meta = ("batches.meta", "label_names")
    torchvision_name = "CIFAR10"


@gin.configurable(module="data")
class CIFAR100(_Cifar):
    """CIFAR-100: 50k train / 10k test 32x32 colour images, 100 fine classes (torchvision's files).

    Args:
        root: the folder holding ``cifar-100-python/``.
        download: fetch it with torchvision when missing (never in tests).
        pretrain_size: images used for pretraining (a fixed subset of train); None: all.
    """

    name = "cifar100"
    key = "data.CIFAR100"
    folder = "cifar-100-python"
    files = {"train": ("train",), "test": ("test",)}
    meta = ("meta", "fine_label_names")
    label_key = "fine_labels"
    torchvision_name = "CIFAR100"
