"""Relative Location (context prediction): Doersch, Gupta & Efros 2015, "Unsupervised
Visual Representation Learning by Context Prediction" (ICCV).

A centre patch and one of its eight neighbours are cut from a 3x3 grid with gaps between
the patches (paper: 96-px patches, 48-px gaps, so a cell of 144 px) and a small random
jitter of each patch (paper: up to 7 px); both go through the shared backbone, their
features are concatenated and an MLP predicts which of the eight neighbours the second
patch is. Labels, row-major around the centre::

    0 1 2
    3 . 4
    5 6 7

Chromatic aberration lets a network find a patch's position in the frame from colour
fringes alone; the paper's counter-measures are selectable (`aberration`):
``"drop"`` keeps one random colour channel of each patch and replaces the other two with
Gaussian noise of 1/100 of the kept channel's standard deviation (`noise`); ``"gray"``
replaces each patch by its luminance (weights 0.299, 0.587, 0.114 on the normalised
channels) in every channel; ``"none"``. On grayscale data (1 channel) both are no-ops:
there is no colour to exploit.

Adaptations, stated: the grid is cut from the augmented view (the paper samples patches
from images resized to 150K-450K pixels); the geometry is given as fractions of a grid
cell (``S // 3`` px) so one setting serves every image size; patches smaller than
`min_patch` px are resized up to it (a no-op at paper scale); the heads use BatchNorm
(`methods.base.mlp`).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, cross_entropy, mlp
from methods.tiles import jigsaw_tiles, jitter_crop

NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)  # label -> cell of the row-major 3x3 grid (4 is the centre)


def patch_pair(x: torch.Tensor, labels: torch.Tensor, patch: int, jitter: int) -> torch.Tensor:
    """The centre patch and the neighbour named by each label.

    x: ``[B, C, S, S]``; labels: ``[B]`` in 0..7 -> ``[B, 2, C, patch, patch]`` (centre first),
    each patch the centred window of its ``S // 3`` cell moved by up to `jitter` px.
    """
    cells = jigsaw_tiles(x, 3)  # [B, 9, C, t, t]
    neighbour = torch.tensor(NEIGHBOURS, device=x.device)[labels]  # [B]
    which = torch.stack([torch.full_like(neighbour, 4), neighbour], 1)  # [B, 2]
    pair = cells[torch.arange(len(x), device=x.device)[:, None], which]  # [B, 2, C, t, t]
    return jitter_crop(pair, patch, max_shift=jitter)


def drop_colours(x: torch.Tensor, noise: float) -> torch.Tensor:
    """Keeps one random channel per image, the others become Gaussian noise with std
    ``noise`` times the kept channel's std. x: ``[N, C, H, W]``; 1 channel: unchanged."""
    n, c = x.shape[:2]
    if c == 1:
        return x
    keep = dist.randint(0, c, (n,), device=x.device)  # [N]
    kept = x[torch.arange(n, device=x.device), keep]  # [N, H, W]
    scale = kept.flatten(1).std(1).view(n, 1, 1, 1) * noise
    mask = F.one_hot(keep, c).to(x.dtype).view(n, c, 1, 1)
    return mask * x + (1 - mask) * dist.randn_like(x) * scale


def gray_project(x: torch.Tensor) -> torch.Tensor:
    """Luminance in every channel. x: ``[N, 3, H, W]``; 1 channel: unchanged."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand_as(x)


@gin.configurable(module="relative_location")
class RelativeLocation(Method):
    """Eight-way relative position of two patches on the shared backbone.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): unused.
        patch_frac: patch side as a fraction of a grid cell (paper: 96 / 144).
        jitter_frac: the largest shift of a patch, as a fraction of a cell (paper: 7 / 144);
            rounded up to whole pixels, so any nonzero value jitters by at least 1 px.
        aberration: ``"drop"`` (colour dropping), ``"gray"`` (luminance) or ``"none"``.
        noise: std of the noise replacing dropped channels, relative to the kept channel's.
        patch_dim: width of the per-patch layer (fc6); 0 for none.
        hidden_dim: width of the layer on the concatenated pair (fc7).
        min_patch: patches smaller than this are resized up to it (0: never).
    """

    data_parallel = True  # per-image patch-pair classification; draws for the global batch (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        patch_frac: float = 96 / 144,
        jitter_frac: float = 7 / 144,
        aberration: str = "drop",
        noise: float = 0.01,
        patch_dim: int = 4096,
        hidden_dim: int = 4096,
        min_patch: int = 0,
    ):
        super().__init__(backbone)
        if aberration not in ("drop", "gray", "none"):
            raise ValueError(
                f"relative_location.RelativeLocation.aberration = {aberration!r}: use 'drop', 'gray' or 'none'"
            )
        d = cast(Encoder, backbone).num_features
        self.patch_frac, self.jitter_frac, self.min_patch = patch_frac, jitter_frac, min_patch
        self.aberration, self.noise = aberration, noise
        self.patch_fc = nn.Sequential(nn.Linear(d, patch_dim), nn.ReLU(inplace=True)) if patch_dim else nn.Identity()
        self.classifier = mlp([2 * (patch_dim or d), hidden_dim, 8])

    def draw(self, b: int, device: torch.device) -> torch.Tensor:
        """Which neighbour each image shows: ``[B]`` in 0..7 (global RNG)."""
        return dist.randint(0, 8, (b,), device=device)

    def geometry(self, size: int) -> tuple[int, int]:
        """(patch side, largest jitter) in pixels for a ``size``-px view."""
        cell = size // 3
        return max(1, int(cell * self.patch_frac)), math.ceil(cell * self.jitter_frac)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch.views[0]  # [B, C, S, S]
        labels = self.draw(len(x), x.device)  # [B]
        patch, jitter = self.geometry(x.shape[-1])
        flat = patch_pair(x, labels, patch, jitter).flatten(0, 1)  # [2B, C, p, p]: centre, neighbour
        if self.aberration == "drop":
            flat = drop_colours(flat, self.noise)
        elif self.aberration == "gray":
            flat = gray_project(flat)
        if patch < self.min_patch:
            flat = F.interpolate(flat, size=(self.min_patch, self.min_patch), mode="bilinear", align_corners=False)
        f = self.patch_fc(self.backbone(flat))  # [2B, patch_dim]
        logits = self.classifier(f.reshape(len(x), -1))  # [B, 8]
        return {"loss": cross_entropy(logits, labels), "acc": (logits.argmax(1) == labels).float().mean()}
