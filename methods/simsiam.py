"""SimSiam: Chen & He 2021, "Exploring Simple Siamese Representation Learning" (CVPR).
Headline: ResNet-50, linear probe 71.3 % top-1 on ImageNet after 800 epochs, 68.1 % after
100 (Table 4).

Two views through one encoder (backbone + projection MLP); a prediction MLP on one side
must match the other side's projection, whose gradient is stopped. No negatives, no
momentum encoder: the paper shows the stop-gradient alone prevents collapse.

State: none beyond weights and BatchNorm statistics (no `after_step`).

Not reproduced: the paper keeps the predictor's learning rate fixed while the rest
follows the cosine schedule (68.1 % vs 67.7 % with a decayed predictor lr, Table 1). The
trainer owns the schedule and applies one lr to every parameter group, and with SGD
momentum and weight decay no gradient rescaling inside the method is equivalent to a
separate lr, so here the predictor's lr decays with the rest. Likewise the paper decays
every parameter, while the trainer exempts biases and norm parameters from weight decay.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from methods.base import Batch, DataInfo, Encoder, Method, fp32, mlp


@fp32
def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetrised negative cosine similarity with stop-gradient (paper eq. 3 and 4):
    ``D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2`` with ``D(p, z) = -cos(p, z)``
    averaged over the batch. Its minimum is -1.

    Args:
        p1: predictions of view 1, ``[N, D]``.
        p2: predictions of view 2, ``[N, D]``.
        z1: projections of view 1, ``[N, D]`` (no gradient flows into them).
        z2: projections of view 2, ``[N, D]``.
    """
    d12 = -F.cosine_similarity(p1, z2.detach(), dim=1).mean()
    d21 = -F.cosine_similarity(p2, z1.detach(), dim=1).mean()
    return d12 / 2 + d21 / 2


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SimSiam's 3-layer projector: BN on every Linear, the output one included (without
    affine parameters), no ReLU at the output. No biases: each Linear is followed by BN."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
        nn.BatchNorm1d(out_dim, affine=False),
    )


@gin.configurable(module="simsiam")
class SimSiam(Method):
    """SimSiam on the shared backbone.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): unused.
        proj_dim: projector hidden and output width (paper: 2048).
        pred_dim: predictor bottleneck width (paper: 512; the predictor maps 2048 -> 512 -> 2048).
    """

    data_parallel = True  # per-sample regression; BatchNorm over the global batch (sync_bn) (harness/dist.py)

    def __init__(self, backbone: nn.Module, data: DataInfo, *, proj_dim: int = 2048, pred_dim: int = 512):
        super().__init__(backbone)
        self.projector = projection_mlp(cast(Encoder, backbone).num_features, proj_dim, proj_dim)
        self.predictor = mlp([proj_dim, pred_dim, proj_dim])  # Linear-BN-ReLU-Linear, no BN at the output

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        v1, v2 = batch.views[:2]  # [B, C, S, S] each
        z1, z2 = self.projector(self.backbone(v1)), self.projector(self.backbone(v2))  # [B, proj_dim]
        p1, p2 = self.predictor(z1), self.predictor(z2)  # [B, proj_dim]
        with torch.no_grad():  # the paper's collapse monitor (Fig. 2): std of l2-normalised outputs
            z_std = F.normalize(z1, dim=1).std(0).mean() * math.sqrt(z1.shape[1])  # ~1; 0 when collapsed
        return {"loss": simsiam_loss(p1, p2, z1, z2), "z_std": z_std}
