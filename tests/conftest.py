"""Shared fixtures: tiny generated data, gin parsed for a method at a test scale."""
from __future__ import annotations

from pathlib import Path

import gin
import pytest
import torch

from harness import ginutil
from harness.data import ImageSet, SYSTEM_DIRS

REPO = Path(__file__).resolve().parent.parent
METHODS = sorted(p.stem for p in (REPO / "gin" / "methods").glob("*.gin"))
# A timm test model keeps unit tests fast; the embedded scale's ResNet-18 runs in the e2e test.
TINY = ["backbone.create.name = 'test_resnet'", "IMAGE_SIZE = 32"]


def fmnist_available() -> bool:
    return any((Path(d) / "train-images-idx3-ubyte.gz").exists() for d in SYSTEM_DIRS)


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def make_images(n: int = 64, classes: int = 4, channels: int = 1, size: int = 28, seed: int = 0) -> ImageSet:
    """Class-dependent blobs plus noise: learnable, but not trivially by pixels alone."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs = []
    for y in labels.tolist():
        cy, cx = 6 + 5 * (y % 2) + torch.randint(0, 6, (), generator=g), 6 + 5 * (y // 2) + torch.randint(0, 6, (), generator=g)
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
        img = (blob * 200 + torch.rand(size, size, generator=g) * 55).clamp(0, 255)
        imgs.append(img.expand(channels, size, size))
    return ImageSet(images=torch.stack(imgs).to(torch.uint8), labels=labels, classes=[str(c) for c in range(classes)],
                    mean=(0.2,) * channels, std=(0.3,) * channels)


@pytest.fixture
def tiny_data() -> ImageSet:
    return make_images()


def parse_method(name: str, *bindings: str) -> None:
    """Parses a method's gin file at the embedded scale with the tiny test network."""
    ginutil.parse([str(REPO / "gin" / "methods" / f"{name}.gin"), "gin/scale/embedded.gin"], [*TINY, *bindings])
