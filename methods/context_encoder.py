"""Context encoder: Pathak, Krähenbühl, Donahue, Darrell & Efros 2016, "Context Encoders:
Feature Learning by Inpainting" (CVPR).

A region of each image is removed (filled with the data's mean colour: 0 in the
normalised view), the backbone encodes what is left, and the light decoder
(methods/decoder.py) paints the image back; the loss is the squared error inside the
removed region (paper eq. 1), optionally plus an adversarial term.

Masks (`mask`), each removing about `area` of the image (paper: a quarter):
  - ``center``: the central square of side ``sqrt(area) S`` (the paper's central region).
  - ``block``: `blocks` random squares of area ``area / blocks`` each, possibly
    overlapping, so at most `area` is removed (the paper's random blocks).
  - ``region``: random shapes of exactly ``round(area S²)`` pixels: coarse uniform noise,
    upsampled bilinearly, its highest pixels. The paper's random regions are PASCAL VOC
    segmentation masks, not available here; these blobs stand in for them.

Overlap: the paper's code predicts a region slightly larger than the hole (4 px at 128 px)
and weights the error on that visible border 10x. Here the decoder paints the whole
image; the error is weighted 1 inside the hole, `overlap_weight` on a ring of
``round(overlap S)`` pixels around it, and `outside_weight` elsewhere (0: the paper's
loss sees only the region), and normalised by the sum of the weights.

Adversarial term (``adversarial = λ_adv > 0``; paper: λ_rec = 0.999, λ_adv = 0.001): a small
discriminator D (no BatchNorm) sees the region, ``mask * image``, real or painted. The
trainer applies one optimizer to one scalar, so the loss is

    (1 - λ_adv) L_rec + λ_adv BCE(D_sg(fake), 1) + BCE(D(real), 1) + BCE(D(sg(fake)), 0)

where D_sg is D evaluated with detached parameters (``torch.func.functional_call``): the
generator's term moves only the backbone and decoder, the discriminator's terms only D
(sg: stop-gradient). The paper's code gives the generator 10x the discriminator's
learning rate; here both share the trainer's. Off by default.

The evaluated representation is the backbone's pooled features. No ImageNet linear-probe
number in the paper.
"""

from __future__ import annotations

import math
from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import gin
from methods.base import Batch, DataInfo, Encoder, Method, fp32
from methods.decoder import Decoder, feature_map_shape

MASKS = ("center", "block", "region")


def center_mask(b: int, size: int, area: float, device: torch.device | None = None) -> torch.Tensor:
    """The central square of side ``round(sqrt(area) size)``: bool ``[B, 1, S, S]``."""
    side = round(math.sqrt(area) * size)
    lo = (size - side) // 2
    m = torch.zeros(b, 1, size, size, dtype=torch.bool, device=device)
    m[:, :, lo : lo + side, lo : lo + side] = True
    return m


def block_mask(b: int, size: int, area: float, blocks: int, device: torch.device | None = None) -> torch.Tensor:
    """The union of `blocks` random squares of area ``area / blocks`` each: bool ``[B, 1, S, S]``."""
    side = max(1, round(math.sqrt(area / blocks) * size))
    corner = torch.randint(0, size - side + 1, (b, blocks, 2), device=device)  # [B, n, (row, col)]
    r = torch.arange(size, device=device)
    rows = (r.view(1, 1, -1) >= corner[..., :1]) & (r.view(1, 1, -1) < corner[..., :1] + side)  # [B, n, S]
    cols = (r.view(1, 1, -1) >= corner[..., 1:]) & (r.view(1, 1, -1) < corner[..., 1:] + side)
    return (rows.unsqueeze(3) & cols.unsqueeze(2)).any(1, keepdim=True)  # [B, 1, S, S]


def region_mask(b: int, size: int, area: float, grain: int = 4, device: torch.device | None = None) -> torch.Tensor:
    """Random blobs of exactly ``round(area size²)`` pixels: the highest pixels of `grain` x
    `grain` uniform noise upsampled to the image. bool ``[B, 1, S, S]``."""
    noise = F.interpolate(
        torch.rand(b, 1, grain, grain, device=device), size=(size, size), mode="bilinear", align_corners=False
    ).view(b, -1)
    idx = noise.topk(round(area * size * size), dim=1).indices  # [B, k]
    return torch.zeros_like(noise, dtype=torch.bool).scatter_(1, idx, True).view(b, 1, size, size)


def ring(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels within `width` (Chebyshev distance) of the mask, outside it: bool like `mask`."""
    if width <= 0:
        return torch.zeros_like(mask)
    grown = F.max_pool2d(mask.float(), 2 * width + 1, stride=1, padding=width) > 0
    return grown & ~mask


@fp32
def inpainting_loss(
    recon: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    border: torch.Tensor,
    border_weight: float,
    outside_weight: float,
) -> torch.Tensor:
    """Weighted mean squared error: weight 1 in `mask`, `border_weight` on `border`,
    `outside_weight` elsewhere, normalised by the weights' sum (times channels).

    Args:
        recon: ``[B, C, S, S]`` the painted image.
        x: ``[B, C, S, S]`` the real image.
        mask: bool ``[B, 1, S, S]``, the removed region.
        border: bool ``[B, 1, S, S]``, disjoint from `mask`.
    """
    w = torch.full_like(mask, outside_weight, dtype=x.dtype)
    w = w.masked_fill(border, border_weight).masked_fill(mask, 1.0)  # [B, 1, S, S]
    return (w * (recon - x) ** 2).sum() / (w.sum() * x.shape[1])


class Discriminator(nn.Module):
    """DCGAN-style: 4x4 stride-2 convolutions with LeakyReLU (no BatchNorm) down to a side
    of at most 4, widths doubling from `width` (at most 8x), then a linear score.
    ``[B, C, S, S]`` -> logits ``[B]``."""

    def __init__(self, channels: int, image_size: int, width: int):
        super().__init__()
        layers: list[nn.Module] = []
        c, s, w = channels, image_size, width
        while s > 4:
            layers += [nn.Conv2d(c, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            c, s, w = w, s // 2, min(2 * w, 8 * width)
        self.features = nn.Sequential(*layers)
        self.score = nn.Linear(c * s * s, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(x).flatten(1)).squeeze(1)


@gin.configurable(module="context_encoder")
class ContextEncoder(Method):
    """Inpainting from the backbone's spatial map.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``channels`` (the decoder's and discriminator's).
        image_size: side of the views (``%IMAGE_SIZE``).
        decoder: the decoder's constructor, e.g. ``@decoder.Decoder``.
        mask: ``center``, ``block`` or ``region``.
        area: fraction of the image removed (at most, for ``block``).
        blocks: squares per image for ``block``.
        overlap: width of the weighted border around the hole, as a fraction of the side
            (paper's code: 4 px at 128).
        overlap_weight: weight of the border's error (paper's code: 10).
        outside_weight: weight of the error elsewhere (paper: 0).
        adversarial: λ_adv; 0 turns the discriminator off.
        disc_width: the discriminator's first width (paper's code: 64).
    """

    data_parallel = True  # per-image inpainting and adversarial terms (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        image_size: int = gin.REQUIRED,
        decoder: Callable[..., nn.Module] = Decoder,
        mask: str = "center",
        area: float = 0.25,
        blocks: int = 4,
        overlap: float = 4 / 128,
        overlap_weight: float = 10.0,
        outside_weight: float = 0.0,
        adversarial: float = 0.0,
        disc_width: int = 64,
    ):
        super().__init__(backbone)
        if mask not in MASKS:
            raise ValueError(f"context_encoder.ContextEncoder.mask = {mask!r}: use one of {', '.join(MASKS)}")
        self.mask_kind, self.area, self.blocks, self.image_size = mask, area, blocks, image_size
        self.overlap_px = round(overlap * image_size)
        self.overlap_weight, self.outside_weight, self.adversarial = overlap_weight, outside_weight, adversarial
        c, h = feature_map_shape(backbone, data.channels, image_size)
        self.decoder = decoder(in_channels=c, out_channels=data.channels, in_size=h, out_size=image_size)
        self.discriminator = Discriminator(data.channels, image_size, disc_width) if adversarial > 0 else None

    def masks(self, b: int, device: torch.device) -> torch.Tensor:
        """This step's removed regions: bool ``[B, 1, S, S]``."""
        if self.mask_kind == "center":
            return center_mask(b, self.image_size, self.area, device)
        if self.mask_kind == "block":
            return block_mask(b, self.image_size, self.area, self.blocks, device)
        return region_mask(b, self.image_size, self.area, device=device)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch.views[0]  # [B, C, S, S]
        m = self.masks(len(x), x.device)  # [B, 1, S, S]
        recon = self.decoder(cast(Encoder, self.backbone).forward_features(x.masked_fill(m, 0.0)))  # [B, C, S, S]
        rec = inpainting_loss(recon, x, m, ring(m, self.overlap_px), self.overlap_weight, self.outside_weight)
        if self.discriminator is None:
            return {"loss": rec}
        fake, real = recon * m, x * m  # the region only
        d = self.discriminator
        adv_d = F.binary_cross_entropy_with_logits(
            d(real), torch.ones(len(x), device=x.device)
        ) + F.binary_cross_entropy_with_logits(d(fake.detach()), torch.zeros(len(x), device=x.device))
        frozen = {n: p.detach() for n, p in d.named_parameters()}
        adv_g = F.binary_cross_entropy_with_logits(
            functional_call(d, frozen, (fake,)), torch.ones(len(x), device=x.device)
        )
        loss = (1 - self.adversarial) * rec + self.adversarial * adv_g + adv_d
        return {"loss": loss, "rec": rec.detach(), "adv_g": adv_g, "adv_d": adv_d}
