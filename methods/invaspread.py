"""Invariant and Spreading Instance Feature: Ye, Zhang, Yuen & Chang 2019, "Unsupervised
Embedding Learning via Invariant and Spreading Instance Feature" (CVPR). The paper
reports no ImageNet number; headline: CIFAR-10, ResNet-18, 128-d, weighted kNN 83.6 %
top-1, with STL-10 results beside it.

Instance discrimination inside the mini-batch, without memory bank or classifier
weights: each image's augmented view must recognise the image among the batch
(eq. 3, "invariant"), and every other instance must not be recognised as it (eq. 5,
"spreading"); the loss is their joint negative log-likelihood (eq. 7). Features are a
linear projection to 128-d, L2-normalised, tau = 0.1. Like the authors' code, both
views serve as anchors: 2B anchors, each against the 2B - 1 others of the batch.

Simplification, stated: the authors' code stops the gradient through one factor of
each inner product (the "weights" side); here the gradient flows through both, as
eq. 7 is written. The paper's first view is the image "without" augmentation; its
code (and this file) augments both views with the same random transform family.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, fp32


@fp32
def invariance_spreading(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Ye et al. eq. 7 over both views: ``-(sum_a log P(pos(a)|a) + sum_a sum_{j != a, pos(a)} log(1 - P(j|a))) / 2B``.

    ``P(j|a) = exp(z_j . z_a / tau) / sum_{k != a} exp(z_k . z_a / tau)``.

    Args:
        z1: features of view 1, ``[B, D]`` (normalised here).
        z2: features of view 2, ``[B, D]``; row i is the positive of z1's row i.
        temperature: tau.
    """
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # [2B, D]
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    log_p = F.log_softmax((z @ z.T / temperature).masked_fill(eye, float("-inf")), dim=1)  # [2B, 2B]
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # [2B]
    is_pos = F.one_hot(partner, 2 * n).bool()  # [2B, 2B]
    log_not = torch.log(-torch.expm1(log_p))  # log(1 - P(j|a)), stable near P = 1
    log_not = torch.where(eye | is_pos, torch.zeros_like(log_not), log_not)
    return -(log_p[is_pos].sum() + log_not.sum()) / (2 * n)


@gin.configurable(module="invaspread")
class InvaSpread(Method):
    """Instance softmax over the batch with a linear 128-d embedding.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): unused.
        out_dim: embedding width (paper: 128).
        temperature: tau (paper: 0.1).
    """

    data_parallel = True  # the instance loss over the gathered global batch (harness/dist.py)

    def __init__(self, backbone: nn.Module, data: DataInfo, *, out_dim: int = 128, temperature: float = 0.1):
        super().__init__(backbone)
        self.head = nn.Linear(cast(Encoder, backbone).num_features, out_dim)
        self.temperature = temperature

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        v1, v2 = batch.views[:2]  # [B, C, S, S] each
        z = self.head(self.backbone(torch.cat([v1, v2])))  # [2B, out_dim]
        z1, z2 = z.chunk(2)
        loss = invariance_spreading(dist.gather(z1), dist.gather(z2), self.temperature)  # over the global batch
        with torch.no_grad():  # does each view pick its partner among the other 2B - 1?
            zn = F.normalize(z, dim=1)
            n = len(z1)
            guess = (zn @ zn.T).fill_diagonal_(-2).argmax(1)  # [2B]
            acc = (guess == torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)).float().mean()
        return {"loss": loss, "acc": acc}
