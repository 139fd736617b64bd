"""The input pipeline: how a pretraining step gets its images.

In-memory datasets (Fashion-MNIST, CIFAR) keep the simple path: the step's global batch is
indexed from the uint8 tensor, every view is drawn on the device for the whole global batch,
and each rank keeps its shard, so N ranks follow the one-process trajectory exactly.

File-backed datasets (`ImageFiles`: ImageNet-style folders) take `FileBatches`: each rank
reads, decodes and crops only its shard of the step's batch, in DataLoader worker
processes that run ahead of training (persistent workers, prefetch, pinned memory and
non-blocking copies on CUDA). Each view's RandomResizedCrop (Szegedy et al. 2015, as the
papers' torchvision pipelines) is cut from the full-resolution decoded image, its box and
flip drawn from a generator seeded by (seed, step, position in the global batch); the
batched augmentations that follow (colour jitter, grayscale, blur, solarize) stay on the
device (`views.Views.from_crops`). A step's images are therefore a pure function of
(seed, step, world size): resume is exact for any number of workers, and a run is
deterministic per world size (the device augmentations draw per rank, so N ranks no longer
follow the one-process trajectory as the in-memory path does).

Decoders (``data.Pipeline.decoder``): ``torchvision`` (``torchvision.io.decode_image``:
libjpeg-turbo on the full image), ``pil`` (PIL, decoding JPEGs at a reduced DCT scale when
every view's crop still holds at least its output size in pixels, i.e. when the reduction
only drops detail the resize would drop), and ``dali`` (NVIDIA DALI: GPU decoding; CUDA and
the ``dali`` extra, ``harness.data.dali``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

import gin
from harness.data.base import DataError, ImageSet
from harness.data.files import VERIFY_HINT
from harness.optim import batch_indices

DECODERS = ("torchvision", "pil", "dali")
# torchvision 0.29 deprecates its image decoders in favour of TorchCodec's; they still run libjpeg-turbo.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)
DECODE_FIX = f"delete or replace the file; {VERIFY_HINT}"  # as `ImageFiles` says it


@dataclasses.dataclass(frozen=True)
class Crop:
    """One view's random resized crop and flip, taken where the image is decoded (`views.Augment`'s)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip: float


def crop_box(rng: np.random.Generator, height: int, width: int, crop: Crop) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop of a ``height x width`` image: an area fraction in
    `crop.scale` and a log-uniform aspect ratio in `crop.ratio`, ten tries, then the centred crop of the
    ratio nearest the image's (the algorithm of torchvision's RandomResizedCrop, Szegedy et al. 2015)."""
    area = height * width
    lo, hi = math.log(crop.ratio[0]), math.log(crop.ratio[1])
    for _ in range(10):
        target = area * rng.uniform(crop.scale[0], crop.scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < crop.ratio[0]:
        w, h = width, round(width / crop.ratio[0])
    elif ratio > crop.ratio[1]:
        w, h = round(height * crop.ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_rng(seed: int, step: int, position: int) -> np.random.Generator:
    """The generator of one sample's crops: a function of (seed, step, position in the global batch) alone,
    so that neither the worker nor the rank that decodes it changes them."""
    return np.random.default_rng([seed, step, position])


def _read_error(path: str, err: Exception) -> DataError:
    return DataError(f"{path}: cannot decode image ({err}). Fix: {DECODE_FIX}")


def decode_full(path: str, channels: int) -> torch.Tensor:
    """One image file at full resolution, uint8 ``[C, H, W]``, by torchvision (libjpeg-turbo, libpng)."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY)
    except (RuntimeError, ValueError, OSError) as err:
        raise _read_error(path, err) from err


def crops_of(
    path: str, channels: int, crops: Sequence[Crop], rng: np.random.Generator, decoder: str
) -> list[torch.Tensor]:
    """Each view's crop of one image, uint8 ``[C, S, S]`` per `crops` entry; boxes drawn in full-resolution
    coordinates (the same for every decoder), then cut from the decoded image and resized (antialiased)."""
    from torchvision.transforms.v2 import functional as TF

    if decoder == "pil":
        image, (height, width), factor = None, _pil_size(path), 1.0
    else:
        image = decode_full(path, channels)
        height, width, factor = image.shape[1], image.shape[2], 1.0
    boxes = [crop_box(rng, height, width, c) for c in crops]
    flips = [bool(rng.random() < c.flip) for c in crops]
    if image is None:  # PIL: decode at the coarsest DCT scale that keeps every crop at least its output size
        shrink = min([min(b[2], b[3]) / c.size for b, c in zip(boxes, crops)] or [1.0])
        image, factor = _pil_decode(path, channels, height, width, max(1.0, shrink))
    out = []
    for (top, left, h, w), c, flip in zip(boxes, crops, flips):
        t, lft = int(top / factor), int(left / factor)
        hh, ww = max(1, round(h / factor)), max(1, round(w / factor))
        view = TF.resized_crop(image, t, lft, hh, ww, [c.size, c.size], antialias=True)  # [C, S, S]
        out.append(view.flip(-1) if flip else view)
    return out


def _pil_size(path: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise _read_error(path, err) from err


def _pil_decode(path: str, channels: int, height: int, width: int, shrink: float) -> tuple[torch.Tensor, float]:
    """``(uint8 [C, h, w], factor)``: the image decoded by PIL, at 1/2, 1/4 or 1/8 of its size (JPEG's DCT
    scaling, ``Image.draft``) when `shrink` allows it; `factor` = full size / decoded size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            if shrink >= 2 and opened.format == "JPEG":
                opened.draft("RGB" if channels == 3 else "L", (math.ceil(width / shrink), math.ceil(height / shrink)))
            im = opened.convert("RGB" if channels == 3 else "L")
            arr = np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, channels)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise _read_error(path, err) from err
    return torch.from_numpy(arr.copy()).permute(2, 0, 1), width / arr.shape[1]


class FileBatches(torch.utils.data.Dataset):
    """Item `step`: this rank's shard of the step's batch, decoded and cropped: ``{"index": [b], "labels": [b],
    "views": [uint8 [b, C, S, S]] per crop, "decoded": b}`` (b = batch / world). Picklable: it runs in workers.

    Args:
        paths: the pretraining images' files.
        labels: int64 ``[N]``.
        channels: 3 or 1.
        crops: one `Crop` per view.
        batch_size: the global batch.
        seed: the run's seed (the batch order, `harness.optim.batch_indices`, and the crops).
        rank, world: this process's shard of each batch.
        decoder: ``torchvision`` or ``pil``.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: torch.Tensor,
        channels: int,
        crops: Sequence[Crop],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        decoder: str = "torchvision",
    ):
        self.paths, self.labels, self.channels, self.crops = list(paths), labels, channels, list(crops)
        self.batch_size, self.seed, self.rank, self.world, self.decoder = batch_size, seed, rank, world, decoder

    def shard(self) -> slice:
        per = self.batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def __getitem__(self, step: int) -> dict:
        idx = batch_indices(len(self.paths), self.batch_size, self.seed, step)  # [B], the global batch
        shard = self.shard()
        per_sample = (
            [
                crops_of(self.paths[i], self.channels, self.crops, sample_rng(self.seed, step, pos), self.decoder)
                for pos, i in zip(range(shard.start, shard.stop), idx[shard].tolist())
            ]
            if self.crops
            else []
        )
        views = [torch.stack([s[v] for s in per_sample]) for v in range(len(self.crops))]  # [b, C, S, S] each
        return {"index": idx[shard], "labels": self.labels[idx[shard]], "views": views, "decoded": len(per_sample)}


class _Steps(torch.utils.data.Sampler):
    def __init__(self, start: int, total: int):
        self.start, self.total = start, total

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.total))

    def __len__(self) -> int:
        return self.total - self.start


@gin.configurable(module="data")
@dataclasses.dataclass
class Pipeline:
    """How file-backed pretraining data reaches the device (in-memory datasets ignore it).

    Args:
        workers: DataLoader worker processes decoding ahead of training (0: in the training process);
            ``auto``: one per CPU this process may use, less one for training, at most 8 (`auto_workers`).
        prefetch: batches each worker keeps ready.
        decoder: one of `DECODERS`.
        pin_memory: page-locked host batches for non-blocking copies; ``auto``: on CUDA.
    """

    workers: int | str = "auto"
    prefetch: int = 2
    decoder: str = "torchvision"
    pin_memory: str | bool = "auto"

    def check(self) -> None:
        """Raises `DataError` (key and fix) for a decoder that cannot run here; checked before any job starts."""
        if self.decoder not in DECODERS:
            raise DataError(f"`data.Pipeline.decoder = {self.decoder!r}` is not one of {', '.join(DECODERS)}")
        if self.workers != "auto" and (
            isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0
        ):
            raise DataError(
                f"`data.Pipeline.workers = {self.workers!r}`: a number of processes >= 0 is needed, or 'auto'"
            )
        if self.decoder == "dali":
            from harness.data import dali

            dali.check()

    def batches(
        self,
        data: ImageSet,
        crops: Sequence[Crop],
        batch_size: int,
        seed: int,
        start: int,
        total: int,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
    ) -> Iterator[dict]:
        """This rank's shard of steps ``start .. total - 1`` of a file-backed `data`, as `FileBatches` items
        with tensors on `device`."""
        self.check()
        files = data.images
        assert not isinstance(files, torch.Tensor)
        items = FileBatches(
            files.paths, data.labels, files.channels, crops, batch_size, seed, rank, world, self.decoder
        )
        if self.decoder == "dali":
            from harness.data import dali

            yield from dali.batches(items, start, total, device, max(1, auto_workers()))
            return
        pin = device.type == "cuda" if self.pin_memory == "auto" else bool(self.pin_memory)
        workers = auto_workers() if self.workers == "auto" else int(self.workers)
        loader = torch.utils.data.DataLoader(
            items,
            batch_size=None,
            sampler=_Steps(start, total),
            num_workers=workers,
            prefetch_factor=self.prefetch if workers else None,
            persistent_workers=workers > 0,
            pin_memory=pin,
            generator=torch.Generator().manual_seed(seed),  # workers' seeds: never drawn from the global RNG
        )
        for item in _worker_errors(loader):
            yield {
                "index": item["index"].to(device, non_blocking=pin),
                "labels": item["labels"].to(device, non_blocking=pin),
                "views": [v.to(device, non_blocking=pin) for v in item["views"]],
                "decoded": item["decoded"],
            }


def auto_workers() -> int:
    """Worker processes for ``workers = 'auto'``: the CPUs this process may use (a SLURM task's allocation)
    less one for the training loop, between 0 and 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


def _worker_errors(loader: Iterable[dict]) -> Iterator[dict]:
    """The loader's items; a `DataError` raised in a worker comes out as itself, without the traceback text
    the DataLoader wraps around it (a corrupt file's message names the file and the fix)."""
    try:
        yield from loader
    except DataError as err:
        text = str(err)
        if "Original Traceback" in text:
            raise DataError(text.rsplit("DataError: ", 1)[-1].strip()) from None
        raise


def file_backed(data: ImageSet) -> bool:
    """Whether `data`'s images are files decoded on demand (`ImageFiles`), not an in-memory tensor."""
    return not isinstance(data.images, torch.Tensor)


def generate_jpeg_tree(
    root: Path,
    classes: Sequence[str],
    per_class: int,
    size: tuple[int, int] = (500, 375),
    splits: Sequence[str] = ("train",),
    seed: int = 0,
    quality: int = 90,
) -> list[Path]:
    """An ImageNet-format ``root/<split>/<class>/<class>_<i>.JPEG`` tree of smooth random colour images (`size` =
    w x h, ImageNet's typical 500 x 375; each class tinted), for benchmarks and tests; returns the files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    w, h = size
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3)).astype(np.uint8)
                arr = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)).astype(int)
                arr[..., c % 3] += 60
                arr += rng.integers(-12, 13, arr.shape)
                path = folder / f"{name}_{i}.JPEG"
                Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=quality)
                files.append(path)
    return files
