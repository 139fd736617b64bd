"""Image files on disk: the one PIL decoder (`decode`), file-backed image tensors
(`ImageFiles`), ImageNet-style ``split/class/image`` trees (`scan_folder`, `ImageFolder`)
and the ``python -m harness.data verify DIR`` check (`verify`, `main`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import gin
from harness.data.base import CachedSplits, DataError, ImageSet, names

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VERIFY_HINT = "`python -m harness.data verify <folder>` lists every unreadable image"


def decode(path: str | Path, size: int, channels: int = 3, crop: bool = True, fix: str | None = None) -> torch.Tensor:
    """One image file as uint8 ``[C, S, S]`` (S = `size`), bilinear-resized by PIL.

    Args:
        path: the image file.
        size: side of the result.
        channels: 3 (RGB) or 1 (grayscale).
        crop: True: shorter side resized to `size`, then the centre ``size x size`` cropped (`ImageFiles`);
            False: the whole image resized to ``size x size``, aspect ratio not kept (VOC's ``global_resize``).
        fix: the advice ending the `DataError` raised for a file that cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    im: Image.Image  # the opened file, then its converted and resized copies
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if crop:
                scale = size / min(im.size)
                w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
                im = im.resize((w, h), Image.Resampling.BILINEAR)
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            else:
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8).reshape(size, size, channels)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"{path}: cannot decode image ({err})" + (f". Fix: {fix}" if fix else "")) from err
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [C, S, S]


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
        return decode(path, self.size, self.channels, crop=True, fix=f"delete or replace the file; {VERIFY_HINT}")

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


def scan_folder(
    folder: Path,
    classes: Sequence[str] | None = None,
    fix: str = "move the folder out, or add the class to the class list",
    skip_unknown: bool = False,
) -> tuple[list[str], list[int], list[str]]:
    """``(paths, labels, classes)`` of a ``class/image`` tree.

    `classes` gives the labels (its order); None: the folder's own subfolders, sorted by name. A
    subfolder not in `classes` is a `DataError` ending in `fix`, or, with `skip_unknown`, left out
    (a full tree read through a subset's class list). A class with no subfolder here keeps its
    label (a split may miss classes).
    """
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise DataError(
            f"image folder {what}: {folder}. Fix: bind `data.ImageFolder.root` to a folder holding "
            "train/ and val/ (one subfolder per class, as torchvision's ImageFolder reads)"
        )
    found = class_dirs(folder)
    classes = found if classes is None else list(classes)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown and skip_unknown:
        found = [c for c in found if c in index]
        if not found:
            raise DataError(
                f"{folder}: none of its {len(unknown)} class folders ({names(unknown)}) is among the "
                f"{len(classes)} listed classes ({names(classes)}). Fix: bind `data.ImageFolder.root` to the "
                "tree that holds them, or check the class list"
            )
    elif unknown:
        raise DataError(
            f"{folder / unknown[0]}: class folder {unknown[0]!r} is not among the {len(classes)} classes "
            f"({names(classes)}){f' (nor are {names(unknown[1:])})' if unknown[1:] else ''}. Fix: {fix}"
        )
    paths, labels = [], []
    for c in found:
        for f in sorted((folder / c).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(f))
                labels.append(index[c])
    if not paths:
        loose = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS]
        hint = (
            f"; {len(loose)} images lie directly in it. Fix: sort them into one subfolder per class (ImageNet's "
            "val: a script such as valprep.sh does it)"
            if loose
            else f". Fix: put the images in one subfolder per class ({folder}/<class>/<image>)"
        )
        raise DataError(f"{folder}: no images found in class subfolders ({', '.join(IMAGE_EXTENSIONS)}){hint}")
    return paths, labels, classes


def read_class_file(path: str | Path, key: str = "data.ImageFolder.classes_file") -> list[str]:
    """The class folder names a class-list file gives, in its order: one name a line, blank lines
    and lines starting with ``#`` skipped. A relative path is the repository's.

    Raises:
        DataError: naming the file (and line), `key` and the fix, when the file is missing or
            unreadable, a line holds more than one name or a path, a name repeats, or none is given.
    """
    given = Path(path).expanduser()
    file = given if given.is_absolute() else REPO_ROOT / given
    fix = (
        f"Fix: bind `{key}` to a text file of class folder names, one a line (# starts a comment), "
        "e.g. gin/scale/imagenet100_classes.txt"
    )
    if not file.is_file():
        what = "is a folder, not a file" if file.exists() else "not found"
        raise DataError(f"class list file {what}: {file}. {fix}")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: unreadable class list ({err}). {fix}") from err
    first: dict[str, int] = {}  # name -> its line
    for line_no, line in enumerate(lines, start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if len(name.split()) > 1 or "/" in name or "\\" in name:
            raise DataError(
                f"{file}, line {line_no}: {name!r} is not one class folder name. Fix: one name a line, "
                "such as n01440764 (put notes on lines starting with #)"
            )
        if name in first:
            raise DataError(
                f"{file}, line {line_no}: {name!r} is listed twice (first on line {first[name]}). "
                "Fix: remove the repeated line"
            )
        first[name] = line_no
    if not first:
        raise DataError(f"{file}: lists no class names. {fix}")
    return list(first)


@gin.configurable(module="data")
class ImageFolder(CachedSplits):
    """A ``root/<split>/<class>/<image>`` tree (ImageNet's layout), decoded on demand.

    Every split uses one class list, so a class keeps its label in every split: by default
    the train split's subfolders, sorted by name. Another split may miss classes, but a
    class subfolder unknown to the list is an error (a probe could never predict it), unless
    `subset_only` reads the listed classes out of a larger tree (ImageNet-100 out of ImageNet).

    Args:
        root: the dataset folder.
        train_dir: subfolder of the training split.
        test_dir: subfolder of the evaluation split (ImageNet: ``val``).
        classes: the class names, their order giving the labels; the train folder must hold
            these subfolders or some of them. None: the train folder's subfolders, sorted.
        classes_file: the same list read from a text file (`read_class_file`: one name a line, ``#``
            comments; a relative path is the repository's), e.g. ``gin/scale/imagenet100_classes.txt``.
            Bind it or `classes`, not both.
        subset_only: True: class subfolders not in the list are left out of every split instead of
            being an error, so a full ImageNet tree is read through a subset's list.
        load_size: side of the stored copy the views crop from (shorter side resize + centre crop).
        channels: 3 (RGB) or 1 (grayscale).
        pretrain_size: images used for pretraining (a fixed subset of train); None: all.
        mean: per-channel mean for normalisation (default: ImageNet's).
        std: per-channel std.
        threads: decoding threads (evaluations; pretraining decodes in `data.Pipeline`'s workers).
        name: what the run records as its dataset (matched against published numbers: ``imagenet``,
            ``imagenet100``) and names its cached features; default ``imagefolder``.
    """

    name = "imagefolder"
    key = "data.ImageFolder"

    def __init__(
        self,
        root: str = gin.REQUIRED,
        train_dir: str = "train",
        test_dir: str = "val",
        classes: Sequence[str] | None = None,
        classes_file: str | None = None,
        subset_only: bool = False,
        load_size: int = 256,
        channels: int = 3,
        pretrain_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        threads: int = 8,
        name: str = "imagefolder",
    ):
        self.name = name
        if isinstance(classes, str):
            raise ValueError(
                f"data.ImageFolder.classes = {classes!r}: a list of class folder names is needed, e.g. ['{classes}']"
            )
        if classes is not None and classes_file is not None:
            raise ValueError(
                f"data.ImageFolder.classes and data.ImageFolder.classes_file = {classes_file!r} are both bound. "
                "Fix: bind one of them (the other to None)"
            )
        self.root, self.dirs = Path(root), {"train": train_dir, "test": test_dir}
        self.classes = None if classes is None else list(classes)
        self._list_key = "data.ImageFolder.classes"  # what the error messages call the list
        if classes_file is not None:
            self.classes = read_class_file(classes_file)
            self._list_key = f"data.ImageFolder.classes_file ({classes_file})"
        if subset_only and self.classes is None:
            raise ValueError(
                "data.ImageFolder.subset_only = True reads only the listed classes, but no list is bound. Fix: "
                "bind data.ImageFolder.classes_file (e.g. 'gin/scale/imagenet100_classes.txt') or "
                "data.ImageFolder.classes, or bind subset_only = False"
            )
        self.subset_only = subset_only
        self.load_size, self.channels, self.pretrain_size, self.threads = load_size, channels, pretrain_size, threads
        self.mean, self.std = tuple(mean), tuple(std)
        self._classes: list[str] | None = None

    def _folder(self, which: str) -> Path:
        """The split's folder; a `DataError` naming the gin key to fix if it is not there."""
        folder = self.root / self.dirs[which]
        if folder.is_dir():
            return folder
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "not found"
            raise DataError(
                f"image folder {what}: {self.root}. Fix: bind `data.ImageFolder.root` to a folder holding "
                f"{self.dirs['train']}/ and {self.dirs['test']}/ (one subfolder per class, as "
                "torchvision's ImageFolder reads)"
            )
        key = "train_dir" if which == "train" else "test_dir"
        held = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        raise DataError(
            f"image folder not found: {folder} (the {which} split; {self.root} holds {names(held)}). "
            f"Fix: bind `data.ImageFolder.{key}` to the subfolder holding the {which} split, or bind "
            "`data.ImageFolder.root` to the dataset folder"
        )

    def class_list(self) -> list[str]:
        """The classes of every split: `classes` (or `classes_file`) if bound, checked against the train
        folder unless `subset_only`, else the train folder's subfolders sorted by name."""
        if self._classes is None:
            train = self._folder("train")
            found = class_dirs(train)
            if self.classes is None:
                self._classes = found
            else:
                dupes = sorted({c for c in self.classes if self.classes.count(c) > 1})
                if not self.classes or dupes:
                    what = f"names {names(dupes)} twice" if dupes else "an empty list"
                    raise DataError(
                        f"`data.ImageFolder.classes`: {what}. Fix: list each class folder name once, "
                        f"or bind it to None for the subfolders of {train}"
                    )
                extra = [c for c in found if c not in set(self.classes)]
                if extra and not self.subset_only:
                    raise DataError(
                        f"{train / extra[0]}: train subfolder {extra[0]!r} is not in "
                        f"`{self._list_key}` ({names(self.classes)})"
                        f"{f' (nor are {names(extra[1:])})' if extra[1:] else ''}. Fix: add it to "
                        f"{self._list_key}, or move the folder out of {train}, or bind "
                        "data.ImageFolder.subset_only = True to read only the listed classes"
                    )
                self._classes = list(self.classes)
        return self._classes

    def read_split(self, which: str) -> ImageSet:
        """``train`` or ``test``: the files of the split's class subfolders (listed, not decoded)."""
        classes = self.class_list()
        folder = self._folder(which)
        fix = (
            f"add it to `{self._list_key}` (and its images to {self.dirs['train']}/ so that a probe "
            f"can learn it), or move the folder out of {folder}"
            if self.classes is not None
            else f"add it to {self.dirs['train']}/ (with training images) or bind data.ImageFolder.classes, "
            f"or move the folder out of {folder}"
        )
        paths, labels, classes = scan_folder(folder, classes, fix, skip_unknown=self.subset_only)
        return ImageSet(
            ImageFiles(paths, self.load_size, self.channels, self.threads),
            torch.tensor(labels, dtype=torch.long),
            classes,
            self.mean,
            self.std,
        )

    def check(self) -> int:
        """Preflight: the root, both split folders, at least one image in class subfolders of each, one
        class list for both, the first image of each decodes. Returns the number of pretraining images;
        raises `DataError` saying what to fix. Lists files but decodes only two."""
        return super().check()


def verify(folder: Path) -> tuple[int, list[str]]:
    """``(images checked, the undecodable ones with the reason)`` under `folder`; a `DataError`
    if `folder` is missing, a file, or holds no images."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise DataError(
            f"{folder}: {what}. Fix: pass the folder holding the images, e.g. "
            "`python -m harness.data verify <data.ImageFolder.root>`"
        )
    files = ImageFiles([str(f) for f in sorted(folder.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS], 8)
    if not len(files):
        raise DataError(
            f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under it. Fix: pass the folder "
            "holding the images, e.g. the data.ImageFolder.root with train/ and val/"
        )
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
