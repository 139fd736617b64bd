"""SimCLR: Chen, Kornblith, Norouzi & Hinton 2020, "A Simple Framework for Contrastive
Learning of Visual Representations" (ICML). Headline: ResNet-50, 1000 epochs, batch
4096, linear probe 69.3 % top-1 on ImageNet (Table 6).

Two augmented views per image, an MLP projection head, and the NT-Xent loss: each view
must pick its partner among the other 2N-1 views of the batch.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, fp32, mlp


@fp32
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalized-temperature cross-entropy over both directions (SimCLR eq. 1).

    Args:
        z1: projections of view 1, ``[N, D]``.
        z2: projections of view 2, ``[N, D]``; row i is the positive of z1's row i.
        temperature: tau.
    """
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # [2N, D]
    sim = z @ z.T / temperature  # [2N, 2N]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # [2N]
    return F.cross_entropy(sim, target)


@gin.configurable(module="simclr")
class SimCLR(Method):
    """SimCLR with a projection head on the shared backbone.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): unused.
        hidden_dim: projection head hidden width (paper: 2048 for ResNet-50).
        out_dim: projection size (paper: 128).
        temperature: NT-Xent tau (paper: 0.1 at batch 4096, Table 5 / B.7).
    """

    data_parallel = True  # NT-Xent over the gathered global batch (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        temperature: float = 0.1,
    ):
        super().__init__(backbone)
        self.head = mlp([cast(Encoder, backbone).num_features, hidden_dim, out_dim])
        self.temperature = temperature

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        v1, v2 = batch.views[:2]  # [B, C, S, S] each
        z = self.head(self.backbone(torch.cat([v1, v2])))  # [2B, out_dim]
        z1, z2 = z.chunk(2)
        loss = nt_xent(dist.gather(z1), dist.gather(z2), self.temperature)  # the global batch's 2N - 2 negatives
        with torch.no_grad():  # contrastive accuracy: does each view find its partner?
            zn = F.normalize(z, dim=1)
            sim = (zn @ zn.T).fill_diagonal_(-2)
            acc = (sim.argmax(1) == torch.cat([torch.arange(len(z1), len(z)), torch.arange(len(z1))])).float().mean()
        return {"loss": loss, "acc": acc}
