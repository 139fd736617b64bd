"""Image-text data: `ImageCaptions` reads a CSV of image paths and captions; `Captioned`
gives any labelled dataset captions made from its class names and prompt templates."""

from __future__ import annotations

import csv
import dataclasses
import zlib
from pathlib import Path
from typing import NamedTuple, Sequence, cast

import torch

import gin
from harness.data.base import CachedSplits, DataError, Dataset, ImageSet, names
from harness.data.files import IMAGENET_MEAN, IMAGENET_STD, ImageFiles

# Prompt templates for captions made from class names (`Captioned`) and for zero-shot
# classification: a few of the kind CLIP (Radford et al. 2021) lists for ImageNet.
PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a good photo of a {}.",
    "a photo of one {}.",
)


class CaptionRows(NamedTuple):
    """The rows of an image-caption CSV: image paths, captions, class names (None without a
    label column) and the CSV line of each row (for messages)."""

    paths: list[str]
    captions: list[str]
    labels: list[str] | None
    lines: list[int]


def read_caption_csv(path: Path, key: str = "data.ImageCaptions.csv") -> CaptionRows:
    """The rows of an image-caption CSV; `key` is the gin binding named when the file is missing.

    The first line names the columns: ``image`` (a path relative to the CSV's folder),
    ``caption`` and, optionally, ``label`` (a class name, for the evaluations).
    """
    if not path.is_file():
        what = "is a folder, not a file" if path.exists() else "not found"
        raise DataError(
            f"caption CSV {what}: {path}. Fix: bind `{key}` to a CSV whose first "
            "line is `image,caption` (or `image,caption,label`)"
        )
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return _read_caption_rows(path, csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(
            f"{path}: unreadable caption CSV ({err}). Fix: save it as UTF-8 CSV, or bind `{key}` to another file"
        ) from err


def _read_caption_rows(path: Path, reader: csv.DictReader) -> CaptionRows:
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    missing = [c for c in ("image", "caption") if c not in columns]
    if missing:
        raise DataError(
            f"{path}: no {' or '.join(repr(c) for c in missing)} column (its first line names: "
            f"{', '.join(columns) or 'nothing'}). Fix: make the first line `image,caption` or "
            "`image,caption,label`"
        )
    paths, captions, labels, lines = [], [], [], []
    for row in reader:
        line = reader.line_num
        rel, caption = (row.get("image") or "").strip(), (row.get("caption") or "").strip()
        if not rel or not caption:
            raise DataError(
                f"{path}, line {line}: empty {'image path' if not rel else 'caption'}. "
                "Fix: fill it in or delete the row"
            )
        file = path.parent / rel
        if not file.is_file():
            raise DataError(
                f"{path}, line {line}: image {file} not found. Fix: image paths are relative to "
                f"the CSV's folder ({path.parent}); correct the path or delete the row"
            )
        if "label" in columns:
            label = (row.get("label") or "").strip()
            if not label:
                raise DataError(
                    f"{path}, line {line}: empty label. Fix: give every row a class name, or drop the label column"
                )
            labels.append(label)
        paths.append(str(file))
        captions.append(caption)
        lines.append(line)
    if not paths:
        raise DataError(f"{path}: no rows after the header. Fix: add one `image,caption` row per image")
    return CaptionRows(paths, captions, labels if "label" in columns else None, lines)


@gin.configurable(module="data")
class ImageCaptions(CachedSplits):
    """Image-caption pairs listed in CSV files (``image,caption[,label]``), decoded on demand.

    Labels are optional: without them, every label is -1 and only pretraining can read the
    split (the evaluations need labels). Classes are the sorted label names of the training
    CSV, for both splits; a test label unknown to them is an error (a probe trained on the
    training split could never predict it). If the training CSV has no labels, the classes
    are the test CSV's.

    Args:
        csv: the training pairs.
        test_csv: the evaluation split (labels needed); None: no test split.
        load_size: side of the stored copy the views crop from (shorter side resize + centre crop).
        channels: 3 (RGB) or 1 (grayscale).
        pretrain_size: images used for pretraining (a fixed subset of train); None: all.
        mean: per-channel mean for normalisation (default: ImageNet's).
        std: per-channel std.
        threads: decoding threads.
    """

    name = "imagecaptions"
    key = "data.ImageCaptions"

    def __init__(
        self,
        csv: str = gin.REQUIRED,
        test_csv: str | None = None,
        load_size: int = 256,
        channels: int = 3,
        pretrain_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        threads: int = 8,
    ):
        self.files = {"train": Path(csv), "test": Path(test_csv) if test_csv else None}
        self.load_size, self.channels, self.pretrain_size, self.threads = load_size, channels, pretrain_size, threads
        self.mean, self.std = tuple(mean), tuple(std)
        self._rows: dict[str, CaptionRows] = {}

    def _read(self, which: str) -> CaptionRows:
        if which not in self._rows:
            if self.files[which] is None:
                raise DataError(
                    f"data.ImageCaptions has no {which} split. Fix: bind "
                    f"`data.ImageCaptions.test_csv = '<csv with image,caption,label>'`"
                )
            key = "data.ImageCaptions.csv" if which == "train" else "data.ImageCaptions.test_csv"
            self._rows[which] = read_caption_csv(cast(Path, self.files[which]), key)
        return self._rows[which]

    def class_list(self) -> list[str]:
        """The classes of both splits: the training CSV's label names, sorted; if it has none, the test CSV's."""
        for which in ("train", "test"):
            if self.files[which] is not None and self._read(which).labels:
                return sorted(set(cast("list[str]", self._read(which).labels)))
        return []

    def read_split(self, which: str) -> ImageSet:
        """``train`` or ``test``: the CSV's rows, their images listed (not decoded), labels from the class list."""
        rows, classes = self._read(which), self.class_list()
        index = {c: i for i, c in enumerate(classes)}
        for label, line in zip(rows.labels or [], rows.lines):
            if label not in index:
                raise DataError(
                    f"{self.files[which]}, line {line}: label {label!r} is not among the "
                    f"{len(classes)} classes of the training CSV {self.files['train']} "
                    f"({names(classes)}): a probe trained on it could never predict it. Fix: add "
                    f"images labelled {label!r} to the training CSV, or delete the row"
                )
        labels = [index[n] for n in rows.labels] if rows.labels else [-1] * len(rows.paths)
        return ImageSet(
            ImageFiles(rows.paths, self.load_size, self.channels, self.threads),
            torch.tensor(labels, dtype=torch.long),
            classes,
            self.mean,
            self.std,
            captions=rows.captions,
        )

    def checked_splits(self) -> Sequence[str]:
        return [which for which in cast("tuple[str, ...]", self.splits) if self.files[which] is not None]

    def check(self) -> int:
        """Preflight: both CSVs readable, their images present, one class list for both, the first image of
        each split decodes. Returns the number of pretraining images; raises `DataError` saying what to fix."""
        return super().check()


def image_keys(images: torch.Tensor | ImageFiles, chunk: int = 4096) -> torch.Tensor:
    """A deterministic integer per image, int64 ``[N]``: a weighted sum of its pixels, or for
    files a CRC of the last two parts of its path (the same wherever the data lives)."""
    if isinstance(images, ImageFiles):
        return torch.tensor([zlib.crc32("/".join(Path(p).parts[-2:]).encode()) for p in images.paths])
    flat = images.reshape(len(images), -1)
    weights = torch.randint(0, 2**20, (flat.shape[1],), generator=torch.Generator().manual_seed(0))
    return torch.cat([(flat[i : i + chunk].long() * weights).sum(1) for i in range(0, len(flat), chunk)])


def with_captions(data: ImageSet, templates: Sequence[str] = PROMPT_TEMPLATES) -> ImageSet:
    """`data` with a caption per image: its class name in a prompt template, the template
    chosen by `image_keys` (the same image gets the same caption in every split and subset)."""
    if len(data) and int(data.labels.min()) < 0:
        raise DataError(
            "captions from class names need labelled images; this split has unlabelled ones (-1). "
            "Fix: give the data a label column, or use its own captions"
        )
    pick = (image_keys(data.images) % len(templates)).tolist()
    captions = [templates[k].format(data.classes[y]) for k, y in zip(pick, data.labels.tolist())]
    return dataclasses.replace(data, captions=captions)


@gin.configurable(module="data")
class Captioned(CachedSplits):
    """Any labelled dataset, each image captioned with its class name in a prompt template
    (``"a photo of a {}."``). For image-text methods on classification data: the captions
    say no more than the labels do.

    Args:
        dataset: e.g. ``@data.FashionMNIST()``.
        templates: prompt templates, each with one ``{}`` for the class name.
    """

    key = "data.Captioned"
    splits = None  # every split of the wrapped dataset, pretrain included, captioned
    pretrain_from_train = False

    def __init__(self, dataset: Dataset = gin.REQUIRED, templates: Sequence[str] = PROMPT_TEMPLATES):
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(
                f"data.Captioned.templates: each template needs exactly one '{{}}' for the class name; "
                f"got {bad or 'none'}"
            )
        self.dataset, self.templates = dataset, tuple(templates)
        self.name = dataset.name  # the same images, so the same cached features

    def read_split(self, which: str) -> ImageSet:
        """The wrapped dataset's split, captioned."""
        return with_captions(self.dataset.split(which), self.templates)

    def check(self) -> int:
        """Preflight: the wrapped dataset's `check`, then the captions of its pretraining split (they need
        labels). Returns the number of pretraining images; raises `DataError` saying what to fix."""
        n = self.dataset.check() if hasattr(self.dataset, "check") else None
        pretrain = self.split("pretrain")
        return len(pretrain) if n is None else n
