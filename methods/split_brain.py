"""Split-Brain autoencoder: Zhang, Isola & Efros 2017, "Split-Brain Autoencoders:
Unsupervised Learning by Cross-Channel Prediction" (CVPR).

Cross-channel prediction in Lab: from the lightness L predict the colour ab, and from ab
predict L, each as classification over quantized values (the paper found classification
better than regression): ab over the in-gamut bins of a grid of 10, soft-encoded onto the
5 nearest bins (sigma 5) as in Zhang et al. 2016; L over `l_bins` uniform bins of [0, 100]
(hard targets). The loss is the sum of the two cross-entropies, each averaged over its
locations.

DEVIATION from the paper, stated plainly: the paper splits the network into two disjoint
half-width towers, one seeing L and one seeing ab, and concatenates their features.
Here one shared backbone (the one `encoder()` exports) serves both directions, so the
representation has the width of every other method's (equal terms): in each batch half
the images (those at even positions of the global batch; the loader's order is random)
show the network only L and two small heads predict ab, the other half shows only ab and
predicts L.

Choices, stated: the exported encoder takes ordinary normalised RGB images, so an L-only
input is shown as the gray RGB image of that lightness (ab zeroed) and an ab-only input
as the RGB image of that colour at L = 50 (L "zeroed" to the middle of its range),
normalised like any view (`methods.color.gray_input` / `colour_input`); the ab bins are
the sRGB-gamut set (`methods.color.ab_bins`); no class rebalancing; L in 50 bins and the
decoder (`methods.color.dense_head`, from `backbone.forward_features`' spatial map, the
targets area-averaged to its resolution) are ours.

Raises `harness.errors.Unsupported` on grayscale data: there is no ab to split off.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, fp32
from methods.color import (
    ab_bins,
    colour_input,
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


def l_bin(lightness: torch.Tensor, bins: int) -> torch.Tensor:
    """L in [0, 100] -> the index of its uniform bin in 0..bins-1 (int64, same shape)."""
    return (lightness / 100 * bins).floor().clamp(0, bins - 1).long()


@fp32
def split_brain_loss(
    ab_logits: torch.Tensor,
    ab_index: torch.Tensor,
    ab_soft: torch.Tensor,
    l_logits: torch.Tensor,
    l_target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two cross-channel losses, each averaged over its locations.

    Args:
        ab_logits: ``[N1, Q]`` L -> ab predictions; ab_index, ab_soft: ``[N1, k]`` their soft targets.
        l_logits: ``[N2, L]`` ab -> L predictions; l_target: ``[N2]`` their bins.
    Returns:
        (L -> ab loss, ab -> L loss).
    """
    return soft_cross_entropy(ab_logits, ab_index, ab_soft).mean(), F.cross_entropy(l_logits, l_target)


@gin.configurable(module="split_brain")
class SplitBrain(Method):
    """L -> ab and ab -> L on one shared backbone with two heads.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``channels`` (3, else `Unsupported`);
            ``mean``, ``std`` (the views' normalisation), to recover RGB.
        grid: ab bin size (10, as in Zhang et al. 2016).
        neighbours: bins per soft-encoded ab target.
        sigma: soft-encoding kernel width.
        l_bins: number of uniform L bins.
        hidden_dim: width of each decoder head.
        upsamples: x2 upsamplings in each head.
    """

    bins: torch.Tensor

    data_parallel = True  # per-pixel losses; the L/ab halves split by global batch position (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        grid: float = 10.0,
        neighbours: int = 5,
        sigma: float = 5.0,
        l_bins: int = 50,
        hidden_dim: int = 256,
        upsamples: int = 3,
    ):
        super().__init__(backbone)
        self.mean, self.std = colour_views("split_brain.SplitBrain", data)
        self.neighbours, self.sigma, self.l_bins = neighbours, sigma, l_bins
        self.register_buffer("bins", ab_bins(grid))  # [Q, 2]
        width = cast(Encoder, backbone).num_features
        self.ab_head = dense_head(width, hidden_dim, len(self.bins), upsamples)  # L -> ab
        self.l_head = dense_head(width, hidden_dim, l_bins, upsamples)  # ab -> L

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        lab = rgb_to_lab(to_unit_rgb(batch.views[0], self.mean, self.std))  # [B, 3, S, S]
        # images at even positions of the global batch show L, at odd ones ab (every shard: half each)
        shows_l = dist.positions(len(lab), lab.device) % 2 == 0  # [B]
        lab = torch.cat([lab[shows_l], lab[~shows_l]])  # [B, 3, S, S]: the L-images first
        h = int(shows_l.sum())
        x = from_unit_rgb(torch.cat([gray_input(lab[:h]), colour_input(lab[h:])]), self.mean, self.std)
        feats = cast(Encoder, self.backbone).forward_features(x)  # [B, D, h', w']
        ab_logits, l_logits = self.ab_head(feats[:h]), self.l_head(feats[h:])  # [h, Q, ...], [B-h, L, ...]
        ab_index, ab_soft = soft_encode(
            flat_targets(lab[:h, 1:], ab_logits.shape[-2:]), self.bins, self.neighbours, self.sigma
        )
        l_target = l_bin(flat_targets(lab[h:, :1], l_logits.shape[-2:])[:, 0], self.l_bins)
        loss_ab, loss_l = split_brain_loss(flat_logits(ab_logits), ab_index, ab_soft, flat_logits(l_logits), l_target)
        return {"loss": loss_ab + loss_l, "loss_l_to_ab": loss_ab.detach(), "loss_ab_to_l": loss_l.detach()}
