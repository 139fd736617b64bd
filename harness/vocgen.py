"""A PASCAL VOC-format tree of Fashion-MNIST composites, for the VOC protocols on CPU.

``python -m harness.vocgen OUT [--images N --size S --seed K --max-items M]`` writes

    OUT/VOCdevkit/VOC2007/JPEGImages/000001.jpg ...
    OUT/VOCdevkit/VOC2007/Annotations/000001.xml ...       # PASCAL VOC XML, 1-based boxes
    OUT/VOCdevkit/VOC2007/ImageSets/Main/{train,val,trainval,test}.txt
    OUT/VOCdevkit/VOC2007/ImageSets/Main/<class>_{train,val,trainval,test}.txt   # 1 / -1 / 0
    OUT/vocgen.json                                        # the settings and counts

Each canvas is a dark, noisy RGB background with 1 to M tinted Fashion-MNIST items at
random positions (a few cut by the border: ``truncated``); later items cover earlier ones.
An item's 28-px image is resized to a square of side 30-65 % of the canvas (38-83 px on
the embedded 128-px canvases), and its box is the tight box of the item's visible pixels
inside that square (Fashion-MNIST items rarely fill their frame, so boxes are often
narrower than the square). An item less than 60 % visible (occluded or cut) is ``difficult``, as VOC
marks objects that are hard to recognise. Half the canvases are test (VOC07: 4952 of
9963), composed from Fashion-MNIST's test split; trainval ones from its train split.
Class names are Fashion-MNIST's, lower-case alphanumerics only (``T-shirt/top`` ->
``tshirttop``), as VOC's (``diningtable``). The tree reads unchanged through
``torchvision.datasets.VOCDetection(OUT, year="2007", image_set=...)``.

Deterministic from the seed; written into a temporary sibling folder and renamed onto
OUT at the end, so a failure leaves no partial tree.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import json
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from harness.data import Dataset, FashionMNIST, ImageSet

SPLITS = ("train", "val", "trainval", "test")
MAX_OVERLAP = 0.3  # largest IoU of a new item's box with an earlier one (else it is placed again)
VISIBLE_MIN = 0.6  # an item with less of its pixels visible is difficult


@dataclasses.dataclass
class Item:
    """One object as written to the XML: VOC's 1-based inclusive pixel box."""

    name: str
    xmin: int
    ymin: int
    xmax: int
    ymax: int
    truncated: int
    difficult: int


@dataclasses.dataclass
class Canvas:
    id: str
    split: str  # "trainval" or "test"
    train: bool  # in the train half of trainval (else val); False for test
    items: list[Item]


def safe_name(name: str) -> str:
    """A class name usable in VOC file names: lower-case letters and digits only."""
    safe = re.sub(r"[^a-z0-9]", "", name.lower())
    if not safe:
        raise ValueError(f"class name {name!r} has no letters or digits to name its VOC files with")
    return safe


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark colour, a linear gradient and pixel noise. Returns float ``[S, S, 3]`` in 0..255."""
    base = rng.uniform(0, 60, 3)
    ramp = np.linspace(-1, 1, size)
    angle = rng.uniform(0, 2 * np.pi)
    grad = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]  # [S, S]
    img = base + grad[..., None] * rng.uniform(0, 20, 3) + rng.normal(0, 6, (size, size, 3))
    return img.clip(0, 255)


def compose(
    rng: np.random.Generator, size: int, source: ImageSet, classes: Sequence[str], max_items: int
) -> tuple[np.ndarray, list[Item]]:
    """One canvas: uint8 ``[S, S, 3]`` and its items (drawn first to last, last on top)."""
    canvas = _background(rng, size)
    # per item: alpha [S, S], Item, 0-based box, unclipped area
    alphas: list[np.ndarray] = []
    items: list[Item] = []
    boxes: list[tuple[int, ...]] = []
    areas: list[int] = []
    for _ in range(int(rng.integers(1, max_items + 1))):
        idx = int(rng.integers(len(source)))
        side = int(round(rng.uniform(0.3, 0.65) * size))
        gray = source.images[idx : idx + 1][0, 0].numpy()  # [28, 28] (a slice: tensors and ImageFiles alike)
        patch = np.asarray(Image.fromarray(gray).resize((side, side), Image.Resampling.BILINEAR), np.float32) / 255
        cut = rng.random() < 0.15  # may cross the border by up to 35 % of its side
        lo, hi = (-int(0.35 * side), size - int(0.65 * side)) if cut else (0, size - side)
        tint = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1), rng.uniform(0.7, 1))) * 255
        for _attempt in range(10):
            x0, y0 = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
            alpha = np.zeros((size, size), np.float32)
            sy, sx = slice(max(y0, 0), min(y0 + side, size)), slice(max(x0, 0), min(x0 + side, size))
            alpha[sy, sx] = np.clip(1.5 * patch[sy.start - y0 : sy.stop - y0, sx.start - x0 : sx.stop - x0], 0, 1)
            ys, xs = np.nonzero(alpha > 0.2)
            full = np.nonzero(patch > 0.2 / 1.5)  # the item's extent had the canvas been unbounded
            if len(ys) == 0 or len(ys) < 0.4 * len(full[0]):
                continue  # mostly outside the canvas
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # 0-based, exclusive max
            if all(_iou(box, b) <= MAX_OVERLAP for b in boxes):
                break
        else:
            continue  # no free place: fewer items on this canvas
        shade = 0.4 + 0.6 * patch  # keeps the item's texture under the tint
        colour = np.zeros((size, size, 3), np.float32)
        colour[sy, sx] = tint * shade[sy.start - y0 : sy.stop - y0, sx.start - x0 : sx.stop - x0, None]
        canvas = canvas * (1 - alpha[..., None]) + colour * alpha[..., None]
        inside = (
            full[1].min() + x0 >= 0
            and full[0].min() + y0 >= 0
            and full[1].max() + x0 < size
            and full[0].max() + y0 < size
        )
        label = classes[int(source.labels[idx])]
        items.append(Item(label, int(box[0]) + 1, int(box[1]) + 1, int(box[2]), int(box[3]), int(not inside), 0))
        alphas.append(alpha)
        boxes.append(box)
        areas.append(int((1.5 * patch > 0.5).sum()))
    covered = np.zeros((size, size), bool)
    for item, alpha, area in zip(reversed(items), reversed(alphas), reversed(areas)):  # top item first
        mask = alpha > 0.5
        seen = int((mask & ~covered).sum())  # neither covered by a later item nor cut by the border
        item.difficult = int(seen < VISIBLE_MIN * area)
        covered |= mask
    return np.rint(canvas).clip(0, 255).astype(np.uint8), items


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def annotation_xml(image_id: str, size: int, items: Sequence[Item]) -> str:
    """The PASCAL VOC annotation of one canvas."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "sslbench Fashion-MNIST composites"
    dims = ET.SubElement(root, "size")
    for key, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(dims, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for it in items:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = it.name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(it.truncated)
        ET.SubElement(obj, "difficult").text = str(it.difficult)
        bb = ET.SubElement(obj, "bndbox")
        for key in ("xmin", "ymin", "xmax", "ymax"):
            ET.SubElement(bb, key).text = str(getattr(it, key))
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def _write_lists(main: Path, canvases: Sequence[Canvas], classes: Sequence[str]) -> None:
    members = {
        "train": [c for c in canvases if c.split == "trainval" and c.train],
        "val": [c for c in canvases if c.split == "trainval" and not c.train],
        "trainval": [c for c in canvases if c.split == "trainval"],
        "test": [c for c in canvases if c.split == "test"],
    }
    for split, cs in members.items():
        (main / f"{split}.txt").write_text("".join(f"{c.id}\n" for c in cs))
        for cls in classes:
            lines = []
            for c in cs:
                mine = [it for it in c.items if it.name == cls]
                label = 1 if any(not it.difficult for it in mine) else 0 if mine else -1
                lines.append(f"{c.id} {label:2d}\n")
            (main / f"{cls}_{split}.txt").write_text("".join(lines))


def generate(
    out: str | Path,
    images: int = 1000,
    size: int = 128,
    seed: int = 0,
    max_items: int = 4,
    dataset: Dataset | None = None,
) -> list[Canvas]:
    """Writes the VOC2007-format tree under ``out`` (which must not exist, or be empty).

    Args:
        out: the folder that will hold ``VOCdevkit/`` (torchvision's VOC ``root``).
        images: canvases in all; half are test.
        size: canvas side in pixels.
        seed: seed of every random choice.
        max_items: most items per canvas (at least one).
        dataset: the source of items, with ``split("train")``, ``split("test")`` giving
            1-channel `ImageSet` s (default: Fashion-MNIST).

    Returns:
        The canvases with their items as written.
    """
    if images < 2 or size < 16 or max_items < 1:
        raise ValueError(f"vocgen needs images >= 2, size >= 16 and max_items >= 1; got {images}, {size}, {max_items}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; delete it or choose another OUT")
    dataset = dataset or FashionMNIST()
    sources = {"trainval": dataset.split("train"), "test": dataset.split("test")}
    classes = [safe_name(c) for c in sources["trainval"].classes]
    rng = np.random.default_rng(seed)
    test = set(rng.permutation(images)[: images // 2].tolist())
    train_half = rng.random(images) < 0.5
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        voc = tmp / "VOCdevkit" / "VOC2007"
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (voc / sub).mkdir(parents=True)
        canvases = []
        for i in range(images):
            split = "test" if i in test else "trainval"
            pixels, items = compose(rng, size, sources[split], classes, max_items)
            canvas = Canvas(f"{i + 1:06d}", split, bool(train_half[i]) and split == "trainval", items)
            Image.fromarray(pixels).save(voc / "JPEGImages" / f"{canvas.id}.jpg", quality=90)
            (voc / "Annotations" / f"{canvas.id}.xml").write_text(annotation_xml(canvas.id, size, items))
            canvases.append(canvas)
        _write_lists(voc / "ImageSets" / "Main", canvases, classes)
        objects = [it for c in canvases for it in c.items]
        info = {
            "generator": "harness.vocgen",
            "images": images,
            "size": size,
            "seed": seed,
            "max_items": max_items,
            "classes": classes,
            "objects": len(objects),
            "difficult": sum(it.difficult for it in objects),
            "truncated": sum(it.truncated for it in objects),
            "trainval": sum(c.split == "trainval" for c in canvases),
            "test": len(test),
        }
        (tmp / "vocgen.json").write_text(json.dumps(info, indent=1) + "\n")
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700; the tree is meant to be shared
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.replace(tmp, out)  # an empty `out` is replaced; a non-empty one makes this fail
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return canvases


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.vocgen", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to create; it will hold VOCdevkit/VOC2007")
    ap.add_argument("--images", type=int, default=1000, help="canvases in all, half of them test (default 1000)")
    ap.add_argument("--size", type=int, default=128, help="canvas side in pixels (default 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-items", type=int, default=4, help="most items per canvas (default 4)")
    ap.add_argument("--fmnist-root", default=None, help="folder with the Fashion-MNIST IDX files (default: found)")
    args = ap.parse_args(argv)
    canvases = generate(
        args.out, args.images, args.size, args.seed, args.max_items, FashionMNIST(root=args.fmnist_root)
    )
    info = json.loads((args.out / "vocgen.json").read_text())
    print(
        f"{args.out}/VOCdevkit/VOC2007: {len(canvases)} images ({info['trainval']} trainval, {info['test']} test), "
        f"{info['objects']} objects ({info['difficult']} difficult, {info['truncated']} truncated)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
