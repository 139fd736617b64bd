"""Reading PASCAL VOC for the VOC protocols (`harness.evals.voc`, `harness.evals.voc_detection`):
a VOCdevkit tree's class and image lists, its images resized whole, the encoder's input
channels and normalisation, and the generated Fashion-MNIST tree (`EmbeddedVOC`, made by
`harness.vocgen`) used when no real VOC is bound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

import gin
from harness import ginutil, store
from harness.data import DataError, decode
from harness.evals import Context

GENERATE_HINT = "python -m harness.vocgen DIR"


def voc_dir(root: Path, year: str = "2007") -> Path:
    return Path(root) / "VOCdevkit" / f"VOC{year}"


def resolve_root(root: str | None, generate_embedded: bool, ctx: Context, key: str) -> Path:
    """The folder holding ``VOCdevkit/VOC2007`` (torchvision's VOC ``root``).

    `key` is the protocol's gin name (``voc.VOC07SVM``), for the error messages.
    """
    if root:
        path = Path(root).expanduser()
        if path.name == "VOCdevkit" and (path / "VOC2007").is_dir():
            path = path.parent
        elif path.name == "VOC2007" and path.parent.name == "VOCdevkit":
            path = path.parent.parent
        if not voc_dir(path).is_dir():
            raise DataError(
                f"{key}.root = {root!r}: no VOCdevkit/VOC2007 folder there. Fix: bind it to the folder "
                f"holding VOCdevkit/ (real PASCAL VOC), or make one: `{GENERATE_HINT}`"
            )
        return path
    if generate_embedded:
        return EmbeddedVOC().root(Path(ctx.pretrain_dir).parent.parent)
    raise DataError(
        f"{key}.root is not set: this protocol reads a PASCAL VOC tree (VOCdevkit/VOC2007). Fix: bind "
        f"`{key}.root = '<folder holding VOCdevkit/>'` (real VOC, or one made by `{GENERATE_HINT}`), or "
        f"`{key}.generate_embedded = True` to generate the Fashion-MNIST one under the results folder"
    )


def voc_classes(root: Path) -> list[str]:
    """Class names of a tree, from its ``ImageSets/Main/<class>_trainval.txt`` files, sorted."""
    main = voc_dir(root) / "ImageSets" / "Main"
    classes = sorted(p.name[: -len("_trainval.txt")] for p in main.glob("*_trainval.txt"))
    if not classes:
        raise DataError(
            f"{main}: no <class>_trainval.txt lists; a VOC tree needs one per class ({GENERATE_HINT} writes them)"
        )
    return classes


def image_labels(root: Path, split: str, classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Image ids of a split (``ImageSets/Main/<split>.txt``) and their labels ``[N, C]``
    from the per-class lists: 1 present, -1 absent, 0 difficult only."""
    main = voc_dir(root) / "ImageSets" / "Main"
    try:
        ids = (main / f"{split}.txt").read_text().split()
    except OSError as err:
        raise DataError(f"{main / f'{split}.txt'}: cannot read the {split} list ({err})") from err
    index = {image_id: i for i, image_id in enumerate(ids)}
    labels = np.full((len(ids), len(classes)), -2, np.int8)
    for c, cls in enumerate(classes):
        path = main / f"{cls}_{split}.txt"
        try:
            rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
            for image_id, value in rows:
                labels[index[image_id], c] = int(value)
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{path}: unreadable or not matching {split}.txt ({type(err).__name__}: {err})") from err
    if (labels == -2).any():
        c = int(np.nonzero((labels == -2).any(0))[0][0])
        raise DataError(f"{main / f'{classes[c]}_{split}.txt'}: lists fewer images than {split}.txt")
    return ids, labels


class ResizedImages:
    """VOC images decoded when sliced, each resized whole to ``size x size`` (Goyal et
    al.'s ``global_resize``): ``images[a:b]`` is uint8 ``[B, C, S, S]``."""

    def __init__(self, paths: Sequence[Path], size: int, channels: int):
        self.paths, self.size, self.channels = list(paths), size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, path: Path) -> torch.Tensor:
        return decode(path, self.size, self.channels, crop=False)

    def __getitem__(self, idx: slice) -> torch.Tensor:
        return torch.stack([self.load(p) for p in self.paths[idx]])


def in_channels(encoder: nn.Module, default: int = 3) -> int:
    """Input channels of an encoder (its timm spec, else its first convolution, else
    `default`: an encoder without convolutions, like raw pixels, reads what it is given)."""
    spec = getattr(encoder, "sslbench_spec", None)
    if spec and "in_chans" in spec:
        return int(spec["in_chans"])
    conv = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else default


def pixel_stats(
    ctx: Context, channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation for VOC images: the bound values, else the pretraining data's (what
    the encoder was trained on, as transfer protocols use ImageNet's on VOC)."""
    if mean is None or std is None:
        data = ctx.dataset.split("train")
        mean, std = mean or data.mean, std or data.std
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"VOC protocol: mean/std have {len(mean)}/{len(std)} values for a {channels}-channel encoder")
    return tuple(map(float, mean)), tuple(map(float, std))


@gin.configurable(module="voc")
class EmbeddedVOC:
    """The generated Fashion-MNIST VOC tree used when a VOC protocol has no ``root``
    (harness.vocgen), made once per results folder: ``<results>/data/voc-fmnist-<hash>``.

    Args:
        images: canvases in all (half test).
        size: canvas side in pixels.
        seed: the generator's seed (the same tree for every run of a table).
        max_items: most items per canvas.
    """

    def __init__(self, images: int = 1000, size: int = 128, seed: int = 0, max_items: int = 4):
        self.images, self.size, self.seed, self.max_items = images, size, seed, max_items

    def params(self) -> dict:
        return {"images": self.images, "size": self.size, "seed": self.seed, "max_items": self.max_items}

    def root(self, results: Path) -> Path:
        """Generates the tree under ``results/data`` unless it is there; returns its root."""
        from harness import vocgen

        folder = Path(results) / "data" / f"voc-fmnist-{ginutil.digest([json.dumps(self.params(), sort_keys=True)])}"
        with store.locked(folder.parent):  # two runs starting together generate it once
            if not (folder / "vocgen.json").is_file():
                print(f"generating the embedded VOC tree in {folder}", flush=True)
                vocgen.generate(folder, self.images, self.size, self.seed, self.max_items)
        return folder
