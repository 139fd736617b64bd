"""Labelled subsets for the few-label protocols: class-balanced seeded draws, and SimCLR's
ImageNet subset files (one image file name per line, e.g. ``n01440764_10026.JPEG``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from harness.data import DataError, ImageFiles, ImageSet


def balanced_indices(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """``per_class`` items of every class present (all of a class that has fewer), drawn
    without replacement by a permutation seeded with ``seed``.

    Returns:
        Sorted indices into ``labels`` ``[<= per_class * classes]``; the same for the same
        (labels, per_class, seed) on every machine.
    """
    if per_class < 1:
        raise ValueError(f"a class-balanced subset needs at least one item per class; got {per_class}")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))  # [N]
    shuffled = labels[perm]  # [N]
    picks = [perm[shuffled == c][:per_class] for c in labels.unique()]
    return torch.cat(picks).sort().values


def per_class_for(percent: float, labels: torch.Tensor) -> int:
    """Items per class so that a balanced subset holds about ``percent`` % of the labels (at least one)."""
    return max(1, round(percent / 100 * len(labels) / len(labels.unique())))


SUBSET_FIX = (
    "Fix: bind `semisup.SemiSupervised.subset_files` to subset files of this dataset (SimCLR's "
    "imagenet_subsets/1percent.txt and 10percent.txt list ImageNet train file names), or to None to draw "
    "class-balanced subsets from `subset_seed`"
)


def check_subset_file(path: str | Path) -> None:
    """Preflight: a `DataError` (the fix) when a subset file is not there; its lines are checked when read."""
    if not Path(path).is_file():
        raise DataError(f"subset file not found: {path}. {SUBSET_FIX}")


def read_subset_file(path: str | Path, data: ImageSet) -> torch.Tensor:
    """Indices of the images a subset file lists, matched by file name against an image-folder split.

    Raises:
        DataError: naming the file, the line and the fix, when the file is missing or empty, a
            name is not in the split (or in it twice), or the split has no files to match.
    """
    path = Path(path)
    fix = SUBSET_FIX
    if not isinstance(data.images, ImageFiles):
        raise DataError(
            f"{path}: a subset file lists image files, but this dataset is held as a tensor with no file "
            f"names (e.g. Fashion-MNIST). {fix}"
        )
    check_subset_file(path)
    where: dict[str, list[int]] = {}
    for i, p in enumerate(data.images.paths):
        where.setdefault(os.path.basename(p), []).append(i)
    folder = os.path.dirname(os.path.dirname(data.images.paths[0])) if data.images.paths else "?"
    picked: dict[int, int] = {}  # dataset index -> line
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        hits = where.get(os.path.basename(name), [])
        if not hits:
            raise DataError(
                f"{path}, line {line_no}: image {name!r} is not in the training split "
                f"({len(data)} images under {folder}). {fix}"
            )
        if len(hits) > 1:
            raise DataError(
                f"{path}, line {line_no}: {name!r} names {len(hits)} images of the training split "
                f"({data.images.paths[hits[0]]}, {data.images.paths[hits[1]]}); file names must be "
                "unique to match a subset file. Fix: rename the duplicates"
            )
        if hits[0] in picked:
            raise DataError(
                f"{path}, line {line_no}: {name!r} is listed twice (first on line {picked[hits[0]]}). "
                "Fix: remove the repeated line"
            )
        picked[hits[0]] = line_no
    if not picked:
        raise DataError(f"{path}: lists no image names. {fix}")
    return torch.tensor(sorted(picked))
