"""BYOL: Grill, Strub, Altché, Tallec, Richemond, Buchatskaya, Doersch, Pires, Guo, Azar,
Piot, Kavukcuoglu, Munos & Valko 2020, "Bootstrap Your Own Latent: A New Approach to
Self-Supervised Learning" (NeurIPS). Headline: ResNet-50, 1000 epochs, batch 4096, linear
probe 74.3 % top-1 on ImageNet (Table 1; 72.5 % after 300 epochs).

An online network (backbone, projector, predictor) learns to predict the projection that a
target network gives of another view of the same image. The target is no second set of
trained weights but an exponential moving average of the online backbone and projector,
whose momentum rises from `base_momentum` to 1 along a cosine (paper section 3.2). No
negatives: the predictor and the slowly moving target keep the representation from
collapsing.

State kept across steps: the target network, ``self.target`` (parameters frozen with
``requires_grad_(False)``, checkpointed with the method, never exported: the exported
encoder is ``self.backbone``). It is updated in `after_step`: parameters by EMA, buffers
(BatchNorm running statistics, never used since the target only runs in training mode)
copied from the online network.

Both views go through each network separately, so BatchNorm statistics are per view as in
the paper. Embedded scale: with few steps (a few hundred rather than the paper's ~300k)
the target moves little at ``base_momentum = 0.996``; that is the paper's value and is kept.
"""

from __future__ import annotations

import copy
import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from methods.base import Batch, DataInfo, Encoder, Method, fp32, mlp


@fp32
def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetrised BYOL loss (paper eq. 2 plus its view-swapped twin).

    Each direction is the mean over the batch of ``||p/|p| - z'/|z'| ||^2 = 2 - 2 cos(p, z')``
    with a stop-gradient on the target projection z'; the two directions are summed.

    Args:
        p1: online predictions of view 1, ``[N, D]``.
        p2: online predictions of view 2, ``[N, D]``.
        z1: target projections of view 1, ``[N, D]`` (no gradient flows into them).
        z2: target projections of view 2, ``[N, D]``.
    """

    def regress(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cos = (F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(1)  # [N]
        return (2 - 2 * cos).mean()

    return regress(p1, z2) + regress(p2, z1)


def byol_momentum(step: int, total: int, base: float) -> float:
    """Target EMA momentum at step k of K: ``1 - (1 - base) (cos(pi k / K) + 1) / 2``."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2


@gin.configurable(module="byol")
class BYOL(Method):
    """BYOL on the shared backbone.

    Args:
        backbone: the shared timm encoder (the online encoder; exported).
        data: the pretraining data's facts (`DataInfo`): unused.
        hidden_dim: projector and predictor hidden width (paper: 4096).
        out_dim: projection size (paper: 256).
        base_momentum: tau_base of the target EMA (paper: 0.996).
    """

    data_parallel = True  # per-sample regression; BatchNorm over the global batch (sync_bn) (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        base_momentum: float = 0.996,
    ):
        super().__init__(backbone)
        self.projector = mlp([cast(Encoder, backbone).num_features, hidden_dim, out_dim])  # Linear-BN-ReLU-Linear
        self.predictor = mlp([out_dim, hidden_dim, out_dim])
        self.target = nn.Sequential(copy.deepcopy(backbone), copy.deepcopy(self.projector)).requires_grad_(False)
        self.base_momentum = base_momentum

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        v1, v2 = batch.views[:2]  # [B, C, S, S] each
        z1, z2 = self.projector(self.backbone(v1)), self.projector(self.backbone(v2))  # [B, out_dim]
        p1, p2 = self.predictor(z1), self.predictor(z2)  # [B, out_dim]
        with torch.no_grad():  # the target's projections: the algorithm's regression targets
            t1, t2 = self.target(v1), self.target(v2)  # [B, out_dim]
            z_std = F.normalize(z1, dim=1).std(0).mean() * math.sqrt(z1.shape[1])  # ~1; 0 when collapsed
        return {"loss": byol_loss(p1, p2, t1, t2), "z_std": z_std}

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        """EMA of the online backbone and projector into the target (paper eq. 1)."""
        tau = byol_momentum(step, total, self.base_momentum)
        online = nn.Sequential(self.backbone, self.projector)  # same module order as the target
        for po, pt in zip(online.parameters(), self.target.parameters()):
            pt.mul_(tau).add_(po, alpha=1 - tau)
        for bo, bt in zip(online.buffers(), self.target.buffers()):
            bt.copy_(bo)
