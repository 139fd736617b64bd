"""Barlow Twins: Zbontar, Jing, Misra, LeCun & Deny 2021, "Barlow Twins: Self-Supervised
Learning via Redundancy Reduction" (ICML). Headline: ResNet-50, 1000 epochs, batch 2048,
linear probe 73.2 % top-1 on ImageNet (Table 1).

Two views through one network (backbone + 3-layer projector, 8192 wide). The
cross-correlation matrix of the two views' batch-standardised projections is pushed
towards the identity: diagonal terms to 1 (invariance), off-diagonal terms to 0
(redundancy reduction), the latter weighted by lambda. No negatives, no predictor,
no momentum encoder, no stop-gradient.

State: none beyond weights and BatchNorm statistics (no `after_step`).

Learning rates: the paper uses 0.2 (x batch/256) for weights and 0.0048 for biases and
BatchNorm parameters. The trainer applies one lr to every group, so the method scales the
gradients of its 1-D parameters (biases, norms) by ``bias_lr_ratio = 0.0048 / 0.2``. The
trainer exempts those parameters from weight decay and from LARS adaptation (as does the
paper), and momentum is linear in the gradient, so with LARS or SGD this equals giving them
the lower lr exactly; with adaptive optimizers (Adam) it has no such meaning.

Embedded scale: the 8192-wide projector (two 8192 x 8192 layers) dominates the cost on
CPU; the paper width stays the default, and a scale file may bind ``proj_dim`` lower.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, fp32


@fp32
def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = 1e-5) -> torch.Tensor:
    """``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` (paper eq. 1 and 2).

    C is the cross-correlation of the two views' projections, each standardised along
    the batch (mean 0, biased variance 1, as BatchNorm without affine parameters).

    Args:
        z1: projections of view 1, ``[N, D]``.
        z2: projections of view 2, ``[N, D]``; row i is the same image as z1's row i.
        lambd: weight of the redundancy-reduction (off-diagonal) term (paper: 5e-3).
        eps: added to the variance before the square root (BatchNorm's default).
    """

    def standardise(z: torch.Tensor) -> torch.Tensor:
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)  # [N, D]

    c = standardise(z1).T @ standardise(z2) / len(z1)  # [D, D]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


@gin.configurable(module="barlow_twins")
class BarlowTwins(Method):
    """Barlow Twins on the shared backbone.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): unused.
        proj_dim: width of the projector's three Linear layers (paper: 8192).
        lambd: off-diagonal weight lambda (paper: 5e-3).
        bias_lr_ratio: lr of biases and norm parameters relative to the weights'
            (paper: 0.0048 / 0.2); 1 leaves them at the weights' lr.
    """

    data_parallel = True  # the cross-correlation of the gathered global batch (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        proj_dim: int = 8192,
        lambd: float = 5e-3,
        bias_lr_ratio: float = 0.0048 / 0.2,
    ):
        super().__init__(backbone)
        dims = [cast(Encoder, backbone).num_features, proj_dim, proj_dim]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):  # Linear-BN-ReLU twice, then a plain Linear
            layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        self.projector = nn.Sequential(*layers, nn.Linear(proj_dim, proj_dim, bias=False))
        self.lambd, self.bias_lr_ratio = lambd, bias_lr_ratio
        if bias_lr_ratio != 1:
            for p in self.parameters():
                if p.ndim <= 1:  # the trainer's no-decay, no-LARS group (harness.trainer.param_groups)
                    p.register_hook(lambda g: g * bias_lr_ratio)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        v1, v2 = batch.views[:2]  # [B, C, S, S] each
        z1, z2 = self.projector(self.backbone(v1)), self.projector(self.backbone(v2))  # [B, proj_dim]
        return {"loss": barlow_twins_loss(dist.gather(z1), dist.gather(z2), self.lambd)}  # C of the global batch
