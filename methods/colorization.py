"""Colorization: Zhang, Isola & Efros 2016, "Colorful Image Colorization" (ECCV).

The network sees the lightness L of an image and predicts, at every location, a
distribution over quantized ab colours (bins on a grid of 10). The target at a location
is its ab value soft-encoded onto the 5 nearest bins with a Gaussian kernel (sigma 5),
and each location's cross-entropy is weighted by the rarity of its colour, so that the
desaturated colours that dominate natural images do not dominate the loss (class
rebalancing, eq. 3-4): with p~ the empirical bin distribution smoothed by a Gaussian
(sigma 5), w ∝ ((1 - lambda) p~ + lambda / Q)^-1 with lambda = 1/2, normalised so that
E_{p~}[w] = 1; a location's weight is that of its nearest bin.

Choices, stated:
- Input: the exported encoder must take ordinary 3-channel images (every method is
  evaluated on the same normalised RGB views), so L is shown as the gray RGB image of the
  same lightness (a = b = 0), normalised like any view, i.e. L replicated over the three
  input channels in the encoder's own input space.
- Bins: the in-gamut set is fixed by the sRGB gamut (`methods.color.ab_bins`: 261 bins)
  rather than taken from the data (the paper's 313 ImageNet bins).
- Empirical distribution: counted online from the training targets (each location's
  nearest bin) in a buffer ``counts`` that the checkpoint carries; a step's weights use
  the counts so far plus the step's own, so the first step already has a distribution.
  The paper counted over the whole of ImageNet before training.
- Decoder: a small head (`methods.color.dense_head`) from `backbone.forward_features`'
  spatial map, upsampled 2^`upsamples` times (3: stride-32 maps become stride 4, the
  paper's 56 px output for 224 px input); the ab targets are area-averaged to the
  decoder's resolution. The loss is the mean, not the sum, over locations.

Raises `harness.errors.Unsupported` on grayscale data: there is no colour to predict.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, fp32
from methods.color import (
    ab_bins,
    colour_views,
    dense_head,
    flat_logits,
    flat_targets,
    from_unit_rgb,
    gray_input,
    rgb_to_lab,
    soft_cross_entropy,
    soft_encode,
    to_unit_rgb,
)


def rebalance_weights(counts: torch.Tensor, bins: torch.Tensor, sigma: float = 5.0, lam: float = 0.5) -> torch.Tensor:
    """Class-rebalancing weights per bin (Zhang et al. 2016, eq. 4).

    Args:
        counts: ``[Q]`` how often each bin was the nearest to a target (all zero: uniform).
        bins: ``[Q, 2]`` bin centres; the distribution is smoothed by a Gaussian of `sigma`
            over their ab distance.
        lam: weight of the uniform distribution in the mix.
    Returns:
        ``[Q]`` weights w with ``sum(p~ * w) == 1`` under the smoothed distribution p~.
    """
    q = len(counts)
    counts = counts.double()
    p = counts / counts.sum() if counts.sum() > 0 else torch.full_like(counts, 1 / q)
    kernel = torch.exp(-(torch.cdist(bins.double(), bins.double()) ** 2) / (2 * sigma**2))  # [Q, Q]
    smooth = kernel @ p
    smooth = smooth / smooth.sum()
    w = 1 / ((1 - lam) * smooth + lam / q)
    return w / (smooth * w).sum()


@fp32
def colorization_loss(
    logits: torch.Tensor, index: torch.Tensor, soft: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Rebalanced multinomial cross-entropy (eq. 2), averaged over locations.

    Args:
        logits: ``[N, Q]`` one row per location.
        index, soft: ``[N, k]`` the soft-encoded target (nearest bin first).
        weights: ``[Q]`` per-bin weights; a location takes its nearest bin's.
    """
    return (weights[index[:, 0]].to(logits.dtype) * soft_cross_entropy(logits, index, soft)).mean()


@gin.configurable(module="colorization")
class Colorization(Method):
    """L -> distribution over ab bins at every location, on the shared backbone.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``channels`` (3, else `Unsupported`);
            ``mean``, ``std`` (the views' normalisation), to recover RGB.
        grid: ab bin size (paper: 10).
        neighbours: bins per soft-encoded target (paper: 5).
        sigma: soft-encoding kernel width (paper: 5).
        smoothing: width of the kernel smoothing the empirical distribution (paper: 5).
        rebalance: lambda, the uniform share in the rebalancing mix (paper: 0.5); 1 gives
            all bins weight 1.
        hidden_dim: decoder width.
        upsamples: x2 upsamplings in the decoder.
    """

    bins: torch.Tensor
    counts: torch.Tensor

    data_parallel = True  # per-pixel loss; rebalancing counts of the global batch (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        grid: float = 10.0,
        neighbours: int = 5,
        sigma: float = 5.0,
        smoothing: float = 5.0,
        rebalance: float = 0.5,
        hidden_dim: int = 256,
        upsamples: int = 3,
    ):
        super().__init__(backbone)
        self.mean, self.std = colour_views("colorization.Colorization", data)
        self.neighbours, self.sigma, self.smoothing, self.rebalance = neighbours, sigma, smoothing, rebalance
        self.register_buffer("bins", ab_bins(grid))  # [Q, 2]
        self.register_buffer("counts", torch.zeros(len(self.bins), dtype=torch.float64))  # [Q] nearest-bin counts
        self.decoder = dense_head(cast(Encoder, backbone).num_features, hidden_dim, len(self.bins), upsamples)
        self._pending: torch.Tensor | None = None  # this step's counts; not state

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        lab = rgb_to_lab(to_unit_rgb(batch.views[0], self.mean, self.std))  # [B, 3, S, S]
        x = from_unit_rgb(gray_input(lab), self.mean, self.std)  # [B, 3, S, S]
        logits = self.decoder(cast(Encoder, self.backbone).forward_features(x))  # [B, Q, h, w]
        index, soft = soft_encode(
            flat_targets(lab[:, 1:], logits.shape[-2:]), self.bins, self.neighbours, self.sigma
        )  # [N, k] each, N = B h w
        seen = torch.bincount(index[:, 0], minlength=len(self.bins)).to(self.counts.dtype)  # [Q]
        seen = dist.all_reduce_sum(seen)  # the global batch's counts: every rank's weights and buffer alike
        weights = rebalance_weights(self.counts + seen, self.bins, self.smoothing, self.rebalance)
        flat = flat_logits(logits)  # [N, Q]
        self._pending = seen
        return {
            "loss": colorization_loss(flat, index, soft, weights),
            "acc": (flat.argmax(1) == index[:, 0]).float().mean(),
        }

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        """Adds the step's nearest-bin counts to the empirical distribution."""
        if self._pending is not None:
            self.counts += self._pending
            self._pending = None
