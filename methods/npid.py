"""NPID: Wu, Xiong, Yu & Lin 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination" (CVPR). Headline: ResNet-50, 200 epochs, ImageNet linear
classifier on conv5 54.0 % top-1 and weighted kNN 46.5 % top-1 (NCE with m = 4096
noise samples).

Every image is its own class. A linear head maps the backbone's features to 128-d,
L2-normalised; a memory bank holds one 128-d feature per image (random on the unit
sphere at first) and stands in for the classifier weights. Noise-contrastive
estimation (sec. 3.2) tells the bank entry of the image from m entries drawn
uniformly from the bank; the normaliser Z is a constant estimated by Monte Carlo
from the first batch (``log_z``, a buffer), as the paper does. With ``exact=True`` the
loss is the non-parametric softmax over the whole bank (eq. 2), which the paper uses
when the bank is small (CIFAR). Proximal regularisation (sec. 3.4) adds
``lambda * |f_i - v_i|^2`` with lambda = 30. After each step the batch's features are
mixed into the bank with momentum 0.5 and re-normalised (`after_step`).

Embedded scale: the bank has one row per pretraining image; `m` is clipped to the bank
size. Half an epoch visits no image twice, so the positive is still the random initial
bank entry of every image: NPID needs several epochs to mean what the paper means.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, cross_entropy, fp32
from methods.memory import MemoryBank


@fp32
def nce_loss(pos: torch.Tensor, neg: torch.Tensor, log_z: torch.Tensor, num_images: int) -> torch.Tensor:
    """NCE of Wu et al. eq. 5-7: the data sample against m uniform noise samples.

    With ``P(i|f) = exp(s_i) / Z`` and noise ``P_n = 1 / n``, ``h = P / (P + m P_n)``;
    the loss is ``-log h(pos) - sum_j log(1 - h(neg_j))``, averaged over the batch.

    Args:
        pos: logits ``v_i . f_i / tau`` of each image's own bank entry, ``[B]``.
        neg: logits of the noise entries, ``[B, m]``.
        log_z: log of the normaliser Z (0-d).
        num_images: n, the bank size.
    """
    log_noise = math.log(neg.shape[1] / num_images)  # log(m P_n)
    log_h_pos = -F.softplus(log_noise - (pos - log_z))  # [B] log P/(P + m P_n)
    log_1mh_neg = -F.softplus((neg - log_z) - log_noise)  # [B, m] log m P_n/(P + m P_n)
    return -(log_h_pos + log_1mh_neg.sum(1)).mean()


def estimate_log_z(neg: torch.Tensor, num_images: int) -> torch.Tensor:
    """Monte Carlo ``Z ~ n * mean_j exp(s_j)`` over noise logits ``[B, m]`` (Wu et al. sec. 3.2), as a log."""
    return torch.logsumexp(neg.flatten(), 0) - math.log(neg.numel()) + math.log(num_images)


@gin.configurable(module="npid")
class NPID(Method):
    """Non-parametric instance discrimination with a memory bank.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``num_images`` (one bank row per image).
        out_dim: feature width (paper: 128).
        temperature: tau (paper: 0.07).
        num_negatives: noise samples m per image (paper: 4096); clipped to the bank size.
        exact: the full softmax over the bank instead of NCE (paper: CIFAR-10).
        bank_momentum: weight of the old bank entry in the update (paper: 0.5).
        prox_weight: lambda of the proximal regulariser (paper: 30; 0 turns it off).
    """

    log_z: torch.Tensor

    data_parallel = True  # memory bank updated with the global batch; noise drawn for it (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        out_dim: int = 128,
        temperature: float = 0.07,
        num_negatives: int = 4096,
        exact: bool = False,
        bank_momentum: float = 0.5,
        prox_weight: float = 30.0,
    ):
        super().__init__(backbone)
        self.head = nn.Linear(cast(Encoder, backbone).num_features, out_dim)
        self.memory = MemoryBank(data.num_images, out_dim, bank_momentum)
        self.register_buffer("log_z", torch.tensor(float("nan")))  # NaN until the first batch sets it
        self.temperature, self.exact, self.prox_weight = temperature, exact, prox_weight
        self.num_negatives = min(num_negatives, data.num_images)
        self._seen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # this step's, for after_step

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        f = F.normalize(self.head(self.backbone(batch.views[0])), dim=1)  # [B, D]
        bank, n = self.memory.bank, len(self.memory)  # [N, D]
        v = bank[batch.index]  # [B, D] each image's own entry v_i^(t-1)
        out: dict[str, torch.Tensor] = {}
        if self.exact:
            logits = f @ bank.T / self.temperature  # [B, N]
            inst = cross_entropy(logits, batch.index)
            acc = logits.detach().argmax(1).eq(batch.index).float().mean()  # finds its own bank entry
            log_z = self.log_z
        else:
            noise = dist.randint(0, n, (len(f), self.num_negatives), device=f.device)  # [B, m] uniform P_n
            neg = torch.einsum("bd,bmd->bm", f, bank[noise]) / self.temperature  # [B, m]
            pos = (f * v).sum(1) / self.temperature  # [B]
            with torch.no_grad():  # Z is a constant: the first batch's estimate, kept afterwards
                first = estimate_log_z(dist.gather_detached(neg), n)  # over the global batch's noise logits
                log_z = torch.where(torch.isnan(self.log_z), first, self.log_z)
            inst = nce_loss(pos, neg, log_z, n)
            acc = (pos.detach() > neg.detach().amax(1)).float().mean()  # own entry above all m noise entries
            out["log_z"] = log_z
        prox = (f - v).pow(2).sum(1).mean()  # |v_i^(t) - v_i^(t-1)|^2
        self._seen = (batch.index, f.detach(), log_z)
        return {
            "loss": inst + self.prox_weight * prox,
            "instance": inst.detach(),
            "prox": prox.detach(),
            "acc": acc,
            **out,
        }

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        """Writes the step's features into the bank and fixes Z after the first batch."""
        if self._seen is None:
            return
        index, f, log_z = self._seen
        self.memory.update(index, f)
        self.log_z.copy_(log_z)
        self._seen = None
