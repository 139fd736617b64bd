"""Datasets as in-memory uint8 tensors, read from their real on-disk formats.

Fashion-MNIST (Xiao et al. 2017) is the embedded default: the IDX files of Debian's
``dataset-fashion-mnist`` package, else a configured folder, else torchvision's download.
`ImageFolder` reads ImageNet-style ``split/class/image`` trees, decoding on demand.
Image-text data: `ImageCaptions` reads a CSV of image paths and captions; `Captioned`
gives any labelled dataset captions made from its class names and prompt templates.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple, Sequence

import gin
import numpy as np
import torch

SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


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

    images: torch.Tensor
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
        images = self.images.select(idx) if isinstance(self.images, ImageFiles) else self.images[idx]
        captions = None if self.captions is None else [self.captions[i] for i in idx.tolist()]
        return dataclasses.replace(self, images=images, labels=self.labels[idx], captions=captions)


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
class FashionMNIST:
    """Fashion-MNIST, 60k train / 10k test 28x28 grayscale images, 10 classes.

    Args:
        root: a folder holding the IDX files, tried first; then the Debian package's
            folder, then ``$SSLBENCH_DATA``.
        download: fall back to torchvision's download into `root` (or ``data/``).
        pretrain_size: images used for pretraining (a fixed subset of train); None: all.
    """

    name = "fashion_mnist"

    def __init__(self, root: str | None = None, download: bool = True, pretrain_size: int | None = None):
        self.root, self.download, self.pretrain_size = root, download, pretrain_size
        self._cache: dict[str, ImageSet] = {}

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
            "Fashion-MNIST not found. Looked in:\n  " + "\n  ".join(map(str, tried)) +
            "\nFix: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four IDX files "
            "(train-images-idx3-ubyte.gz, ...) in a folder and bind `data.FashionMNIST.root = '<folder>'` "
            "or set SSLBENCH_DATA=<folder>.")

    def split(self, which: str) -> ImageSet:
        """``train`` (60k), ``test`` (10k) or ``pretrain`` (a subset of train)."""
        if which == "pretrain":
            return self.split("train").subset(self.pretrain_size)
        if which not in FMNIST_FILES:
            raise ValueError(f"unknown split {which!r}; use train, test or pretrain")
        if which not in self._cache:
            folder = self._locate()
            img_file, lbl_file = (_find(folder, s) for s in FMNIST_FILES[which])
            try:
                images, labels = read_idx(img_file), read_idx(lbl_file)
            except DataError as err:
                raise DataError(f"{err}, or bind `data.FashionMNIST.root` to a folder holding intact IDX "
                                "files") from err
            if images.ndim != 3 or len(images) != len(labels):
                raise DataError(f"{img_file}: expected [N, 28, 28] images matching {lbl_file} ({images.shape} images, "
                                f"{len(labels)} labels). Fix: fetch both files again, or bind `data.FashionMNIST.root` "
                                "to a folder holding intact IDX files")
            self._cache[which] = ImageSet(
                images=torch.from_numpy(images.copy()).unsqueeze(1), labels=torch.from_numpy(labels.astype(np.int64)),
                classes=FMNIST_CLASSES, mean=(0.2860,), std=(0.3530,))
        return self._cache[which]

    def check(self) -> int:
        """Preflight: reads both splits (downloading them if `download` allows) and returns the number of
        pretraining images; raises `DataError` saying what to fix."""
        _check_pretrain_size("data.FashionMNIST", self.pretrain_size)
        self.split("train")
        self.split("test")
        return len(self.split("pretrain"))


def _check_pretrain_size(key: str, n: int | None) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"`{key}.pretrain_size = {n!r}`: not a number of images. Fix: bind it to a positive "
                        "integer, or to None for the whole training split")


def _names(names: Sequence[str], k: int = 5) -> str:
    """``'a', 'b', ... (N in all)``: a short preview of a list of names."""
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "") if names else "none"


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFiles:
    """Image files decoded when indexed: ``files[idx]`` is uint8 ``[B, C, S, S]``.

    Each image is resized (shorter side to `size`) and centre-cropped to ``size x size``;
    the views then crop from that copy. Decoding runs on `threads` threads (PIL releases
    the GIL). A file that cannot be decoded stops the run with its path: a benchmark
    whose images silently vary between runs cannot be compared; `python -m harness.data
    verify DIR` lists every bad file at once.
    """

    def __init__(self, paths: Sequence[str], size: int, channels: int = 3, threads: int = 8):
        self.paths, self.size, self.channels, self.threads = list(paths), size, channels, threads

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.channels, self.size, self.size)

    def select(self, idx: torch.Tensor) -> "ImageFiles":
        return ImageFiles([self.paths[i] for i in idx.tolist()], self.size, self.channels, self.threads)

    def load(self, path: str) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
                scale = self.size / min(im.size)
                w, h = max(self.size, round(im.width * scale)), max(self.size, round(im.height * scale))
                im = im.resize((w, h), Image.BILINEAR)
                left, top = (w - self.size) // 2, (h - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
                arr = np.asarray(im, dtype=np.uint8).reshape(self.size, self.size, self.channels)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DataError(f"{path}: cannot decode image ({err}). Fix: delete or replace the file; "
                            "`python -m harness.data verify <folder>` lists every unreadable image") from err
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [C, S, S]

    def __getitem__(self, idx: torch.Tensor | slice | int) -> torch.Tensor:
        if isinstance(idx, int):
            return self.load(self.paths[idx])
        picks = self.paths[idx] if isinstance(idx, slice) else [self.paths[i] for i in idx.tolist()]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(self.threads) as pool:
            return torch.stack(list(pool.map(self.load, picks)))  # [B, C, S, S]


def class_dirs(folder: Path) -> list[str]:
    """The class subfolders of a split folder, sorted by name (hidden ones, e.g. ``.ipynb_checkpoints``, skipped)."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_folder(folder: Path, classes: Sequence[str] | None = None,
                fix: str = "move the folder out, or add the class to the class list",
                ) -> tuple[list[str], list[int], list[str]]:
    """``(paths, labels, classes)`` of a ``class/image`` tree.

    `classes` gives the labels (its order); None: the folder's own subfolders, sorted by name. A
    subfolder not in `classes` is a `DataError` ending in `fix`. A class with no subfolder here
    keeps its label (a split may miss classes).
    """
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise DataError(f"image folder {what}: {folder}. Fix: bind `data.ImageFolder.root` to a folder holding "
                        "train/ and val/ (one subfolder per class, as torchvision's ImageFolder reads)")
    found = class_dirs(folder)
    classes = found if classes is None else list(classes)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DataError(f"{folder / unknown[0]}: class folder {unknown[0]!r} is not among the {len(classes)} classes "
                        f"({_names(classes)}){f' (nor are {_names(unknown[1:])})' if unknown[1:] else ''}. Fix: {fix}")
    paths, labels = [], []
    for c in found:
        for f in sorted((folder / c).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(f))
                labels.append(index[c])
    if not paths:
        loose = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS]
        hint = (f"; {len(loose)} images lie directly in it. Fix: sort them into one subfolder per class (ImageNet's "
                "val: a script such as valprep.sh does it)" if loose else
                f". Fix: put the images in one subfolder per class ({folder}/<class>/<image>)")
        raise DataError(f"{folder}: no images found in class subfolders ({', '.join(IMAGE_EXTENSIONS)}){hint}")
    return paths, labels, classes


def _probe(images: torch.Tensor | ImageFiles) -> None:
    """Decodes the first image of a file-backed split: catches data that is wholly unreadable
    (e.g. Git LFS pointers named .jpg) before any job starts."""
    if isinstance(images, ImageFiles) and len(images):
        images.load(images.paths[0])


@gin.configurable(module="data")
class ImageFolder:
    """A ``root/<split>/<class>/<image>`` tree (ImageNet's layout), decoded on demand.

    Every split uses one class list, so a class keeps its label in every split: by default
    the train split's subfolders, sorted by name. Another split may miss classes, but a
    class subfolder unknown to the list is an error (a probe could never predict it).

    Args:
        root: the dataset folder.
        train_dir: subfolder of the training split.
        test_dir: subfolder of the evaluation split (ImageNet: ``val``).
        classes: the class names, their order giving the labels; the train folder must hold
            these subfolders or some of them. None: the train folder's subfolders, sorted.
        load_size: side of the stored copy the views crop from (shorter side resize + centre crop).
        channels: 3 (RGB) or 1 (grayscale).
        pretrain_size: images used for pretraining (a fixed subset of train); None: all.
        mean: per-channel mean for normalisation (default: ImageNet's).
        std: per-channel std.
        threads: decoding threads.
    """

    name = "imagefolder"

    def __init__(self, root: str = gin.REQUIRED, train_dir: str = "train", test_dir: str = "val",
                 classes: Sequence[str] | None = None, load_size: int = 256, channels: int = 3,
                 pretrain_size: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, threads: int = 8):
        if isinstance(classes, str):
            raise ValueError(f"data.ImageFolder.classes = {classes!r}: a list of class folder names is needed, "
                             f"e.g. ['{classes}']")
        self.root, self.dirs = Path(root), {"train": train_dir, "test": test_dir}
        self.classes = None if classes is None else list(classes)
        self.load_size, self.channels, self.pretrain_size, self.threads = load_size, channels, pretrain_size, threads
        self.mean, self.std = tuple(mean), tuple(std)
        self._classes: list[str] | None = None
        self._cache: dict[str, ImageSet] = {}

    def _folder(self, which: str) -> Path:
        """The split's folder; a `DataError` naming the gin key to fix if it is not there."""
        folder = self.root / self.dirs[which]
        if folder.is_dir():
            return folder
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "not found"
            raise DataError(f"image folder {what}: {self.root}. Fix: bind `data.ImageFolder.root` to a folder holding "
                            f"{self.dirs['train']}/ and {self.dirs['test']}/ (one subfolder per class, as "
                            "torchvision's ImageFolder reads)")
        key = "train_dir" if which == "train" else "test_dir"
        held = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        raise DataError(f"image folder not found: {folder} (the {which} split; {self.root} holds {_names(held)}). "
                        f"Fix: bind `data.ImageFolder.{key}` to the subfolder holding the {which} split, or bind "
                        "`data.ImageFolder.root` to the dataset folder")

    def class_list(self) -> list[str]:
        """The classes of every split: `classes` if bound (checked against the train folder), else the
        train folder's subfolders sorted by name."""
        if self._classes is None:
            train = self._folder("train")
            found = class_dirs(train)
            if self.classes is None:
                self._classes = found
            else:
                dupes = sorted({c for c in self.classes if self.classes.count(c) > 1})
                if not self.classes or dupes:
                    what = f"names {_names(dupes)} twice" if dupes else "an empty list"
                    raise DataError(f"`data.ImageFolder.classes`: {what}. Fix: list each class folder name once, "
                                    f"or bind it to None for the subfolders of {train}")
                extra = [c for c in found if c not in set(self.classes)]
                if extra:
                    raise DataError(f"{train / extra[0]}: train subfolder {extra[0]!r} is not in "
                                    f"`data.ImageFolder.classes` ({_names(self.classes)})"
                                    f"{f' (nor are {_names(extra[1:])})' if extra[1:] else ''}. Fix: add it to "
                                    f"data.ImageFolder.classes, or move the folder out of {train}")
                self._classes = list(self.classes)
        return self._classes

    def split(self, which: str) -> ImageSet:
        """``train``, ``test`` or ``pretrain`` (a subset of train)."""
        if which == "pretrain":
            return self.split("train").subset(self.pretrain_size)
        if which not in self.dirs:
            raise ValueError(f"unknown split {which!r}; use train, test or pretrain")
        if which not in self._cache:
            classes = self.class_list()
            folder = self._folder(which)
            fix = (f"add it to `data.ImageFolder.classes` (and its images to {self.dirs['train']}/ so that a probe "
                   f"can learn it), or move the folder out of {folder}" if self.classes is not None else
                   f"add it to {self.dirs['train']}/ (with training images) or bind data.ImageFolder.classes, "
                   f"or move the folder out of {folder}")
            paths, labels, classes = scan_folder(folder, classes, fix)
            self._cache[which] = ImageSet(ImageFiles(paths, self.load_size, self.channels, self.threads),
                                          torch.tensor(labels, dtype=torch.long), classes, self.mean, self.std)
        return self._cache[which]

    def check(self) -> int:
        """Preflight: the root, both split folders, at least one image in class subfolders of each, one
        class list for both, the first image of each decodes. Returns the number of pretraining images;
        raises `DataError` saying what to fix. Lists files but decodes only two."""
        _check_pretrain_size("data.ImageFolder", self.pretrain_size)
        for which in ("train", "test"):
            _probe(self.split(which).images)
        return len(self.split("pretrain"))


# Prompt templates for captions made from class names (`Captioned`) and for zero-shot
# classification: a few of the kind CLIP (Radford et al. 2021) lists for ImageNet.
PROMPT_TEMPLATES = ("a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
                    "a photo of the {}.", "a close-up photo of a {}.", "a cropped photo of the {}.",
                    "a good photo of a {}.", "a photo of one {}.")


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
        raise DataError(f"caption CSV {what}: {path}. Fix: bind `{key}` to a CSV whose first "
                        "line is `image,caption` (or `image,caption,label`)")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return _read_caption_rows(path, csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: unreadable caption CSV ({err}). Fix: save it as UTF-8 CSV, or bind `{key}` "
                        "to another file") from err


def _read_caption_rows(path: Path, reader: csv.DictReader) -> CaptionRows:
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    missing = [c for c in ("image", "caption") if c not in columns]
    if missing:
        raise DataError(f"{path}: no {' or '.join(repr(c) for c in missing)} column (its first line names: "
                        f"{', '.join(columns) or 'nothing'}). Fix: make the first line `image,caption` or "
                        "`image,caption,label`")
    paths, captions, labels, lines = [], [], [], []
    for row in reader:
        line = reader.line_num
        rel, caption = (row.get("image") or "").strip(), (row.get("caption") or "").strip()
        if not rel or not caption:
            raise DataError(f"{path}, line {line}: empty {'image path' if not rel else 'caption'}. "
                            "Fix: fill it in or delete the row")
        file = path.parent / rel
        if not file.is_file():
            raise DataError(f"{path}, line {line}: image {file} not found. Fix: image paths are relative to "
                            f"the CSV's folder ({path.parent}); correct the path or delete the row")
        if "label" in columns:
            label = (row.get("label") or "").strip()
            if not label:
                raise DataError(f"{path}, line {line}: empty label. Fix: give every row a class name, "
                                "or drop the label column")
            labels.append(label)
        paths.append(str(file))
        captions.append(caption)
        lines.append(line)
    if not paths:
        raise DataError(f"{path}: no rows after the header. Fix: add one `image,caption` row per image")
    return CaptionRows(paths, captions, labels if "label" in columns else None, lines)


@gin.configurable(module="data")
class ImageCaptions:
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

    def __init__(self, csv: str = gin.REQUIRED, test_csv: str | None = None, load_size: int = 256,
                 channels: int = 3, pretrain_size: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, threads: int = 8):
        self.files = {"train": Path(csv), "test": Path(test_csv) if test_csv else None}
        self.load_size, self.channels, self.pretrain_size, self.threads = load_size, channels, pretrain_size, threads
        self.mean, self.std = tuple(mean), tuple(std)
        self._rows: dict[str, CaptionRows] = {}
        self._cache: dict[str, ImageSet] = {}

    def _read(self, which: str) -> CaptionRows:
        if which not in self._rows:
            if self.files[which] is None:
                raise DataError(f"data.ImageCaptions has no {which} split. Fix: bind "
                                f"`data.ImageCaptions.test_csv = '<csv with image,caption,label>'`")
            key = "data.ImageCaptions.csv" if which == "train" else "data.ImageCaptions.test_csv"
            self._rows[which] = read_caption_csv(self.files[which], key)
        return self._rows[which]

    def class_list(self) -> list[str]:
        """The classes of both splits: the training CSV's label names, sorted; if it has none, the test CSV's."""
        for which in ("train", "test"):
            if self.files[which] is not None and self._read(which).labels:
                return sorted(set(self._read(which).labels))
        return []

    def split(self, which: str) -> ImageSet:
        """``train``, ``test`` or ``pretrain`` (a subset of train)."""
        if which == "pretrain":
            return self.split("train").subset(self.pretrain_size)
        if which not in self.files:
            raise ValueError(f"unknown split {which!r}; use train, test or pretrain")
        if which not in self._cache:
            rows, classes = self._read(which), self.class_list()
            index = {c: i for i, c in enumerate(classes)}
            for name, line in zip(rows.labels or [], rows.lines):
                if name not in index:
                    raise DataError(f"{self.files[which]}, line {line}: label {name!r} is not among the "
                                    f"{len(classes)} classes of the training CSV {self.files['train']} "
                                    f"({_names(classes)}): a probe trained on it could never predict it. Fix: add "
                                    f"images labelled {name!r} to the training CSV, or delete the row")
            labels = [index[n] for n in rows.labels] if rows.labels else [-1] * len(rows.paths)
            self._cache[which] = ImageSet(ImageFiles(rows.paths, self.load_size, self.channels, self.threads),
                                          torch.tensor(labels, dtype=torch.long), classes, self.mean, self.std,
                                          captions=rows.captions)
        return self._cache[which]

    def check(self) -> int:
        """Preflight: both CSVs readable, their images present, one class list for both, the first image of
        each split decodes. Returns the number of pretraining images; raises `DataError` saying what to fix."""
        _check_pretrain_size("data.ImageCaptions", self.pretrain_size)
        for which in ("train", "test"):
            if self.files[which] is not None:
                _probe(self.split(which).images)
        return len(self.split("pretrain"))


def image_keys(images: torch.Tensor | ImageFiles, chunk: int = 4096) -> torch.Tensor:
    """A deterministic integer per image, int64 ``[N]``: a weighted sum of its pixels, or for
    files a CRC of the last two parts of its path (the same wherever the data lives)."""
    if isinstance(images, ImageFiles):
        return torch.tensor([zlib.crc32("/".join(Path(p).parts[-2:]).encode()) for p in images.paths])
    flat = images.reshape(len(images), -1)
    weights = torch.randint(0, 2**20, (flat.shape[1],), generator=torch.Generator().manual_seed(0))
    return torch.cat([(flat[i:i + chunk].long() * weights).sum(1) for i in range(0, len(flat), chunk)])


def with_captions(data: ImageSet, templates: Sequence[str] = PROMPT_TEMPLATES) -> ImageSet:
    """`data` with a caption per image: its class name in a prompt template, the template
    chosen by `image_keys` (the same image gets the same caption in every split and subset)."""
    if len(data) and int(data.labels.min()) < 0:
        raise DataError("captions from class names need labelled images; this split has unlabelled ones (-1). "
                        "Fix: give the data a label column, or use its own captions")
    pick = (image_keys(data.images) % len(templates)).tolist()
    captions = [templates[k].format(data.classes[y]) for k, y in zip(pick, data.labels.tolist())]
    return dataclasses.replace(data, captions=captions)


@gin.configurable(module="data")
class Captioned:
    """Any labelled dataset, each image captioned with its class name in a prompt template
    (``"a photo of a {}."``). For image-text methods on classification data: the captions
    say no more than the labels do.

    Args:
        dataset: e.g. ``@data.FashionMNIST()``.
        templates: prompt templates, each with one ``{}`` for the class name.
    """

    def __init__(self, dataset=gin.REQUIRED, templates: Sequence[str] = PROMPT_TEMPLATES):
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(f"data.Captioned.templates: each template needs exactly one '{{}}' for the class name; "
                             f"got {bad or 'none'}")
        self.dataset, self.templates = dataset, tuple(templates)
        self.name = dataset.name  # the same images, so the same cached features
        self._cache: dict[str, ImageSet] = {}

    def split(self, which: str) -> ImageSet:
        """The wrapped dataset's split, captioned."""
        if which not in self._cache:
            self._cache[which] = with_captions(self.dataset.split(which), self.templates)
        return self._cache[which]

    def check(self) -> int:
        """Preflight: the wrapped dataset's `check`, then the captions of its pretraining split (they need
        labels). Returns the number of pretraining images; raises `DataError` saying what to fix."""
        n = self.dataset.check() if hasattr(self.dataset, "check") else None
        pretrain = self.split("pretrain")
        return len(pretrain) if n is None else n


def warnings_for(data: ImageSet, which: str = "train") -> list[str]:
    """Human-readable warnings about a split that runs but whose results mislead: a single class
    (every accuracy trivially 100 %), classes without images, no labels at all."""
    labelled = data.labels[data.labels >= 0]
    if len(data) and not len(labelled):
        return [f"the {which} split has no labels (every label is -1): only pretraining can use it, not the "
                "evaluations that train on labels"]
    counts = torch.bincount(labelled, minlength=len(data.classes)).tolist()
    present = [c for c, k in zip(data.classes, counts) if k]
    empty = [c for c, k in zip(data.classes, counts) if not k]
    if len(data.classes) == 1:
        return [f"the {which} split has 1 class ({data.classes[0]!r}): every classification accuracy is "
                "trivially 100 %"]
    if len(present) == 1:
        return [f"the {which} split has images of 1 class only ({present[0]!r}; its other {len(empty)} classes "
                f"have none): a classifier trained on it always predicts {present[0]!r}"]
    if empty:
        return [f"the {which} split has no images of {len(empty)} of its {len(data.classes)} classes "
                f"({_names(empty)}): " + ("a probe trained on it never predicts them" if which == "train" else
                                          "their accuracy is not measured")]
    return []


def verify(folder: Path) -> tuple[int, list[str]]:
    """``(images checked, the undecodable ones with the reason)`` under `folder`; a `DataError`
    if `folder` is missing, a file, or holds no images."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise DataError(f"{folder}: {what}. Fix: pass the folder holding the images, e.g. "
                        "`python -m harness.data verify <data.ImageFolder.root>`")
    files = ImageFiles([str(f) for f in sorted(folder.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS], 8)
    if not len(files):
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under it. Fix: pass the folder "
                        "holding the images, e.g. the data.ImageFolder.root with train/ and val/")
    bad = []
    for p in files.paths:
        try:
            files.load(p)
        except DataError as err:
            bad.append(str(err).split(". Fix:")[0])
    return len(files), bad


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.data verify DIR``: list unreadable images; exit 1 if any, 2 if DIR holds no images."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="python -m harness.data")
    ap.add_argument("command", choices=["verify"])
    ap.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    try:
        n, bad = verify(args.folder)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if bad:
        print("\n".join(bad))
        print(f"{args.folder}: {len(bad)} of {n} images cannot be decoded", file=sys.stderr)
        return 1
    print(f"{args.folder}: every image decodes ({n} checked)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
