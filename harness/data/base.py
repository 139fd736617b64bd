"""What every dataset shares: the in-memory split (`ImageSet`), the error (`DataError`), the
`Dataset` seam the harness reads, and `CachedSplits`, the split logic each dataset inherits."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import torch

if TYPE_CHECKING:
    from harness.data.files import ImageFiles


class DataError(FileNotFoundError):
    """Data that is missing or malformed; the message says where it looked and how to fix it."""


@dataclasses.dataclass
class ImageSet:
    """A labelled split held in memory.

    Attributes:
        images: uint8 ``[N, C, H, W]``, a tensor or `ImageFiles` decoded when indexed.
        labels: int64 ``[N]``.
        classes: class names, indexed by label.
        mean: per-channel mean of the training images in [0, 1].
        std: per-channel std of the training images in [0, 1].
        captions: one caption per image (image-text methods), or None.
    """

    images: torch.Tensor | ImageFiles
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    captions: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def subset(self, n: int | None, seed: int = 0) -> "ImageSet":
        """The first `n` items of a fixed permutation (the same for every run of a table)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        images = self.images[idx] if isinstance(self.images, torch.Tensor) else self.images.select(idx)
        captions = None if self.captions is None else [self.captions[i] for i in idx.tolist()]
        return dataclasses.replace(self, images=images, labels=self.labels[idx], captions=captions)


@runtime_checkable
class Dataset(Protocol):
    """What the harness reads of a dataset (``job.run.dataset``).

    Attributes:
        name: names the cached features (two datasets of the same images share one name).
    """

    name: str

    def split(self, which: str) -> ImageSet:
        """``train``, ``test`` or ``pretrain``; a `DataError` saying what to fix if it cannot be read."""
        ...

    def check(self) -> int:
        """Preflight before any job starts: reads what it can cheaply, returns the number of pretraining
        images, raises `DataError` saying what to fix."""
        ...


class CachedSplits:
    """`Dataset.split` and `Dataset.check` for a dataset that implements `read_split`.

    ``split("pretrain")`` is the first `pretrain_size` images of a fixed permutation of
    train (with `pretrain_from_train`; else it is read like any split); every other split
    in `splits` is read once by `read_split` and kept; an unknown one is a `ValueError`.

    Attributes:
        key: the gin name (``data.FashionMNIST``), for messages.
        splits: the split names `read_split` reads; None: whatever it accepts.
        pretrain_from_train: ``pretrain`` is a subset of ``train``, not read by `read_split`.
        pretrain_size: images used for pretraining; None: all of train.
    """

    key: str = "data"
    splits: tuple[str, ...] | None = ("train", "test")
    pretrain_from_train: bool = True
    pretrain_size: int | None = None

    def read_split(self, which: str) -> ImageSet:
        raise NotImplementedError

    @property
    def _cache(self) -> dict[str, ImageSet]:
        return self.__dict__.setdefault("_split_cache", {})

    def split(self, which: str) -> ImageSet:
        """``train``, ``test`` or ``pretrain`` (a subset of train)."""
        if which == "pretrain" and self.pretrain_from_train:
            return self.split("train").subset(self.pretrain_size)
        if self.splits is not None and which not in self.splits:
            raise ValueError(f"unknown split {which!r}; use {', '.join(self.splits)} or pretrain")
        if which not in self._cache:
            self._cache[which] = self.read_split(which)
        return self._cache[which]

    def checked_splits(self) -> Sequence[str]:
        """The splits `check` reads (all of `splits` unless a dataset lacks one)."""
        return self.splits or ()

    def check(self) -> int:
        """Preflight: `pretrain_size` valid, every split of `checked_splits` readable and the first image of
        each decodes. Returns the number of pretraining images; raises `DataError` saying what to fix."""
        check_pretrain_size(self.key, self.pretrain_size)
        for which in self.checked_splits():
            probe(self.split(which).images)
        return len(self.split("pretrain"))


def probe(images: torch.Tensor | ImageFiles) -> None:
    """Decodes the first image of a file-backed split: catches data that is wholly unreadable
    (e.g. Git LFS pointers named .jpg) before any job starts."""
    if not isinstance(images, torch.Tensor) and len(images):
        images[0]


def check_pretrain_size(key: str, n: int | None) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(
            f"`{key}.pretrain_size = {n!r}`: not a number of images. Fix: bind it to a positive "
            "integer, or to None for the whole training split"
        )


def names(items: Sequence[str], k: int = 5) -> str:
    """``'a', 'b', ... (N in all)``: a short preview of a list of names."""
    shown = ", ".join(repr(n) for n in items[:k])
    return shown + (f", ... ({len(items)} in all)" if len(items) > k else "") if items else "none"


def warnings_for(data: ImageSet, which: str = "train") -> list[str]:
    """Human-readable warnings about a split that runs but whose results mislead: a single class
    (every accuracy trivially 100 %), classes without images, no labels at all."""
    labelled = data.labels[data.labels >= 0]
    if len(data) and not len(labelled):
        return [
            f"the {which} split has no labels (every label is -1): only pretraining can use it, not the "
            "evaluations that train on labels"
        ]
    counts = torch.bincount(labelled, minlength=len(data.classes)).tolist()
    present = [c for c, k in zip(data.classes, counts) if k]
    empty = [c for c, k in zip(data.classes, counts) if not k]
    if len(data.classes) == 1:
        return [
            f"the {which} split has 1 class ({data.classes[0]!r}): every classification accuracy is trivially 100 %"
        ]
    if len(present) == 1:
        return [
            f"the {which} split has images of 1 class only ({present[0]!r}; its other {len(empty)} classes "
            f"have none): a classifier trained on it always predicts {present[0]!r}"
        ]
    if empty:
        return [
            f"the {which} split has no images of {len(empty)} of its {len(data.classes)} classes "
            f"({names(empty)}): "
            + ("a probe trained on it never predicts them" if which == "train" else "their accuracy is not measured")
        ]
    return []
