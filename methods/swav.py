"""SwAV: Caron, Misra, Mairal, Goyal, Bojanowski & Joulin 2020, "Unsupervised Learning of
Visual Features by Contrasting Cluster Assignments" (NeurIPS). Headline: ResNet-50, 800
epochs, batch 4096, multi-crop 2x224 + 6x96, linear probe 75.3 % top-1 on ImageNet (Table 1).

Every crop is embedded (backbone, MLP head, L2 norm) and scored against K prototypes (a
bias-free Linear whose rows are kept unit-norm). The codes of each global crop are the
Sinkhorn-Knopp equipartition of its scores (no gradient); every other crop, small ones
included, must predict them: the swapped-prediction loss (eq. 1-2).

Paper details and how they are kept here:
  * Prototypes frozen for the first `freeze_prototypes_steps` (313 = one epoch at batch
    4096): ``loss`` detaches them while the step counter buffer ``steps_done`` (advanced in
    ``after_step``) is below it, so they get no gradient, like the paper's ``p.grad = None``.
    The method clips it to one epoch (``num_images // batch``), the paper's intent.
  * Prototypes renormalised after every optimizer step (``after_step``; at init too).
  * Optional queue of past global-crop embeddings (``queue`` buffer, newest first) joins the
    Sinkhorn problem once full (paper: 3840 at batch 256, none at 4096; off by default).
    Clipped to ``num_images - batch`` rows so a small data set never repeats itself in it.
  * Crops of one resolution go through the network together (BatchNorm per resolution).
"""

from __future__ import annotations

from typing import Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, fp32, mlp
from methods.sinkhorn import sinkhorn


@fp32
def swapped_prediction(
    scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float
) -> torch.Tensor:
    """SwAV's loss: each crop predicts the codes of every other (global) crop.

    Args:
        scores: per crop, ``[B, K]`` cosine similarities to the prototypes.
        codes: per assigned crop ``i`` (crop ``i`` of `scores`), ``[B, K]`` targets, rows sum to 1.
        temperature: tau of the softmax over prototypes.
    Returns:
        Mean over assigned crops of the mean over the other crops of the cross-entropy.
    """
    total = scores[0].new_zeros(())
    for i, q in enumerate(codes):
        sub = sum(-(q * F.log_softmax(s / temperature, dim=1)).sum(1).mean() for v, s in enumerate(scores) if v != i)
        total = total + sub / (len(scores) - 1)
    return total / len(codes)


def _same_size_groups(views: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: list[list[torch.Tensor]] = []
    for v in views:
        if groups and groups[-1][-1].shape[-2:] == v.shape[-2:]:
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups


@gin.configurable(module="swav")
class SwAV(Method):
    """SwAV with multi-crop, prototypes and Sinkhorn-Knopp codes.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``num_images`` (bounds the queue and the freeze).
        hidden_dim: projection head hidden width (paper: 2048).
        out_dim: embedding size (paper: 128).
        num_prototypes: K (paper: 3000).
        temperature: tau of the swapped prediction (paper: 0.1).
        epsilon: Sinkhorn entropy weight (paper: 0.05).
        sinkhorn_iterations: paper: 3.
        num_global_crops: the first views, whose codes are computed (paper: 2).
        freeze_prototypes_steps: steps with frozen prototypes (paper: 313, one epoch).
        queue_length: past embeddings per global crop in the Sinkhorn problem (0: no queue).
        queue_start_steps: steps before the queue starts filling (paper: 15 epochs).
    """

    steps_done: torch.Tensor
    queue: torch.Tensor
    queue_filled: torch.Tensor

    data_parallel = True  # Sinkhorn over the gathered global batch; the queue takes every rank's (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        num_prototypes: int = 3000,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        num_global_crops: int = 2,
        freeze_prototypes_steps: int = 313,
        queue_length: int = 0,
        queue_start_steps: int = 0,
    ):
        super().__init__(backbone)
        self.head = mlp([cast(Encoder, backbone).num_features, hidden_dim, out_dim])
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        self.num_images, self.temperature, self.epsilon = data.num_images, temperature, epsilon
        self.iterations, self.num_global_crops = sinkhorn_iterations, num_global_crops
        self.freeze_prototypes_steps, self.queue_start_steps = freeze_prototypes_steps, queue_start_steps
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue", torch.zeros(num_global_crops, min(queue_length, data.num_images), out_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # valid rows of the queue
        self._stash: torch.Tensor | None = None  # this step's global embeddings, for after_step

    def _queue_rows(self, batch_size: int) -> int:
        """Rows of the queue used this step: all of it once full, else none."""
        rows = min(self.queue.shape[1], self.num_images - batch_size)
        return rows if rows > 0 and int(self.queue_filled) >= rows else 0

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        b, g = len(batch.views[0]), self.num_global_crops
        world = dist.world()[1]  # the codes, the queue and the epoch are the global batch's
        z = torch.cat(
            [F.normalize(self.head(self.backbone(torch.cat(group))), dim=1) for group in _same_size_groups(batch.views)]
        )  # [V*B, out_dim]
        frozen = int(self.steps_done) < min(self.freeze_prototypes_steps, self.num_images // (b * world))
        w = self.prototypes.weight.detach() if frozen else self.prototypes.weight  # [K, out_dim]
        scores = (z @ w.T).split(b)  # V x [B, K]
        codes = []
        with torch.no_grad():
            rows = self._queue_rows(b * world)
            mine = slice(rows + dist.world()[0] * b, rows + (dist.world()[0] + 1) * b)  # this rank's rows of s
            for i in range(g):
                every = dist.gather_detached(scores[i].detach())  # [W*B, K]: Sinkhorn over the global batch
                s = torch.cat([self.queue[i, :rows] @ w.T, every]) if rows else every  # [rows+W*B, K]
                codes.append(sinkhorn(s, self.epsilon, self.iterations)[mine] * len(s))  # [B, K]
        stash = dist.gather_detached(z[: g * b].detach().view(g, b, -1).transpose(0, 1))  # [W*B, G, out_dim]
        self._stash = stash.transpose(0, 1)  # [G, W*B, out_dim]: every rank's, in batch order
        loss = swapped_prediction(scores, codes, self.temperature)
        with torch.no_grad():  # do the two first crops agree on their top prototype?
            agree = (scores[0].argmax(1) == scores[min(1, len(scores) - 1)].argmax(1)).float().mean()
        return {"loss": loss, "agree": agree, "frozen": agree.new_tensor(float(frozen))}

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        self.steps_done += 1
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        length = self.queue.shape[1]
        if length and self._stash is not None and step >= self.queue_start_steps:
            new = self._stash[:, :length]  # [G, <=L, out_dim], newest first
            self.queue.copy_(torch.cat([new, self.queue[:, : length - new.shape[1]]], dim=1))
            self.queue_filled.fill_(min(length, int(self.queue_filled) + new.shape[1]))
        self._stash = None
