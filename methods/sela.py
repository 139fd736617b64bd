"""SeLa: Asano, Rupprecht & Vedaldi 2020, "Self-labelling via simultaneous clustering and
representation learning" (ICLR). Headline: ResNet-50 with 10 heads of 3000 clusters, 400
epochs, linear probe 61.5 % top-1 on ImageNet (Table 5).

Labels and network share one objective, the cross-entropy between the heads' predictions
and the labels, under the constraint that every head splits the data into equal clusters.
Training the network is SGD on it; optimising the labels is an optimal-transport problem,
solved by Sinkhorn-Knopp on ``P ** lambda`` (lambda = 25) and rounded to hard labels; it is
repeated a number of times over training (100 in the paper, spaced quadratically: frequent at
first). Each head has its own labels; the loss is the mean of the heads' cross-entropies.

How the seam (batches only, no data set) is bridged, stated plainly:
  * ``bank`` ``[num_images, D]`` holds each image's backbone features from its last visit
    (the training view, as the paper's pseudo-label pass uses the training augmentations),
    written in ``after_step``; a label optimisation applies the current heads to it (the
    paper also stores pre-head features and applies the heads at optimisation time).
  * ``labels`` ``[heads, num_images]`` start as a random equipartition (the paper's
    initialisation) and are re-optimised in ``after_step`` on the bank's filled rows; the
    paper's first optimisation, before any training, has no bank to work on here.
  * An image that was not in the bank at the last optimisation (``covered`` buffer) gets,
    when seen, the label that optimisation's cluster scaling ``log_col`` ``[heads, K]`` gives
    its current prediction: ``argmax_k lambda * log p_k + log_col_k`` (the row scaling does
    not change a row's argmax). At less than one epoch this labels every image seen after
    the first optimisation.
  * K is clipped to ``num_images // 128``; the Sinkhorn tolerance test runs every 10
    iterations, like the paper's.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, fp32
from methods.sinkhorn import sinkhorn_scalings


@fp32
def heads_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over heads of the cross-entropy. logits: ``[H, B, K]``; labels: ``[H, B]``."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def self_label(
    logits: torch.Tensor, lam: float, tolerance: float = 0.1, max_iterations: int = 10_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """SeLa's label optimisation for one head: equipartitioned hard labels.

    Args:
        logits: ``[N, K]`` head outputs for the whole (banked) data set.
        lam: lambda, the power of the probabilities (paper: 25).
        tolerance: Sinkhorn stopping tolerance on the row scaling (paper: 0.1).
        max_iterations: a bound on Sinkhorn iterations.
    Returns:
        labels ``[N]`` (argmax of each row of the transport plan) and the log column
        scaling ``[K]``.
    """
    log_p = lam * F.log_softmax(logits.detach().double(), dim=1)  # [N, K], log P^lambda
    _, log_col = sinkhorn_scalings(log_p, max_iterations, tolerance, check_every=10)
    return (log_p + log_col[None]).argmax(1), log_col


@gin.configurable(module="sela")
class SeLa(Method):
    """SeLa: several linear heads trained on self-labels optimised by Sinkhorn-Knopp.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``num_images`` (one pseudo-label per image; the clipped K).
        num_heads: clustering heads (paper: 10).
        num_clusters: K per head (paper: 3000).
        lam: lambda (paper: 25).
        num_label_updates: label optimisations over the run (paper: 100), quadratically spaced.
        tolerance: Sinkhorn stopping tolerance (paper: 0.1).
    """

    labels: torch.Tensor
    bank: torch.Tensor
    filled: torch.Tensor
    covered: torch.Tensor
    log_col: torch.Tensor
    updates: torch.Tensor

    data_parallel = True  # the bank takes every rank's features: one label optimisation on every rank (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        num_heads: int = 10,
        num_clusters: int = 3000,
        lam: float = 25.0,
        num_label_updates: int = 100,
        tolerance: float = 0.1,
    ):
        super().__init__(backbone)
        num_images = data.num_images
        d, k = cast(Encoder, backbone).num_features, max(2, min(num_clusters, num_images // 128))
        self.heads = nn.ModuleList(nn.Linear(d, k) for _ in range(num_heads))
        self.lam, self.num_label_updates, self.tolerance = lam, num_label_updates, tolerance
        equal = torch.arange(num_images) % k  # the paper's initial labels: a shuffled equipartition
        self.register_buffer("labels", torch.stack([equal[torch.randperm(num_images)] for _ in range(num_heads)]))
        self.register_buffer("bank", torch.zeros(num_images, d))
        self.register_buffer("filled", torch.zeros(num_images, dtype=torch.bool))
        self.register_buffer("covered", torch.zeros(num_images, dtype=torch.bool))
        self.register_buffer("log_col", torch.zeros(num_heads, k))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._stash: tuple[torch.Tensor, torch.Tensor] | None = None

    def update_steps(self, total: int) -> set[int]:
        """Steps after which labels are optimised: ``total * (j / (n - 1)) ** 2`` (SeLa's schedule)."""
        n = self.num_label_updates
        return {math.ceil(total * (j / (n - 1)) ** 2) - 1 for j in range(1, n)} if n > 1 else set()

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        f = self.backbone(batch.views[0])  # [B, D]
        logits = torch.stack([h(f) for h in self.heads])  # [H, B, K]
        labels = self.labels[:, batch.index]  # [H, B]
        if int(self.updates) > 0:
            with torch.no_grad():
                late = self.lam * F.log_softmax(logits.detach(), dim=2) + self.log_col[:, None]  # [H, B, K]
                labels = torch.where(self.covered[batch.index][None], labels, late.argmax(2))
        self._stash = (batch.index, f.detach())
        loss = heads_cross_entropy(logits, labels)
        return {"loss": loss, "acc": (logits.argmax(2) == labels).float().mean().detach()}

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        if self._stash is not None:
            index, f = dist.gather_detached(self._stash[0]), dist.gather_detached(self._stash[1])  # every rank's
            self.bank[index], self.filled[index] = f, True
            self._stash = None
        if step in self.update_steps(total) and step + 1 < total and bool(self.filled.any()):
            self.optimise_labels()

    @torch.no_grad()
    def optimise_labels(self) -> None:
        """Re-optimises every head's labels on the bank's filled rows."""
        rows = self.filled.nonzero()[:, 0]
        f = self.bank[rows]  # [n, D]
        for h, head in enumerate(self.heads):
            labels, log_col = self_label(head(f), self.lam, self.tolerance)
            self.labels[h, rows] = labels
            self.log_col[h] = log_col.float()
        self.covered.copy_(self.filled)
        self.updates += 1
