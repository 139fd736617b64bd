"""PIRL: Misra & van der Maaten 2020, "Self-Supervised Learning of Pretext-Invariant
Representations" (CVPR). Headline: ResNet-50, 800 epochs, ImageNet linear probe 63.6 %
top-1 (Table 1).

The representation of an image must match that of its jigsaw-transformed version
rather than predict the permutation. The image goes through the backbone and a linear
layer to 128-d (f); its 3x3 tiles go one by one through the same backbone, each to
128-d, and their features, concatenated in the shuffled order, through a second linear
layer to 128-d (g). A memory bank holds m_I, an average of each image's f (momentum
0.5), and the loss mixes two NCE terms against it (eq. 5):
L = lambda * L_NCE(m_I, g(v_{I^t})) + (1 - lambda) * L_NCE(m_I, f(v_I)).

Adaptations, stated: the m bank negatives are drawn once per step and shared by the
batch (uniform, with replacement), and clipped to the bank size (``num_images``);
tiles come from a second augmented view (the first is v_I) with a random crop inside
each cell (paper: 64 of 85 px), and tiles smaller than `min_tile` px (at 32 px images
they are 8 px) are resized up to it so the ResNet stem has something to see; no
per-tile colour jitter. The bank (`methods.memory.MemoryBank`, shared with NPID) is
updated in `after_step` from the step's f(v_I).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from methods.base import Batch, DataInfo, Encoder, Method, fp32
from methods.memory import MemoryBank
from methods.tiles import jigsaw_tiles, jitter_crop, shuffle_tiles


@fp32
def pirl_nce(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """PIRL's NCE loss (eqs. 2-3), averaged over the batch.

    h(a, b) = e(a, b) / (e(a, b) + sum_{n in D_N} e(a, n)) with e(a, b) = exp(cos(a, b) / tau);
    L = -log h(q, p) - sum_{n in D_N} log(1 - h(q, n)).

    Args:
        query: ``[B, D]`` (g(v_{I^t}) or f(v_I)).
        positive: ``[B, D]``, row i is the positive of query row i (m_I).
        negatives: ``[M, D]`` shared by every query (bank entries m_{I'}).
        tau: temperature.
    """
    q, p, n = F.normalize(query, dim=1), F.normalize(positive, dim=1), F.normalize(negatives, dim=1)
    s_pos = (q * p).sum(1) / tau  # [B]
    s_neg = q @ n.T / tau  # [B, M]
    lse_neg = torch.logsumexp(s_neg, dim=1)  # [B] log sum_n e(q, n)
    log_h_pos = s_pos - torch.logaddexp(s_pos, lse_neg)  # [B]
    log_1m_h_neg = lse_neg[:, None] - torch.logaddexp(s_neg, lse_neg[:, None])  # [B, M] log(1 - h(q, n))
    return -(log_h_pos + log_1m_h_neg.sum(1)).mean()


@gin.configurable(module="pirl")
class PIRL(Method):
    """PIRL with the jigsaw transform and a memory bank.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``num_images`` (one bank row per image).
        out_dim: embedding size of f and g (paper: 128).
        temperature: tau (paper: 0.07).
        num_negatives: bank negatives per step (paper: 32,000), clipped to the bank.
        bank_momentum: m_I <- normalize(mom * m_I + (1 - mom) * f(v_I)) (paper: 0.5).
        mix: lambda, the weight of the jigsaw term (paper: 0.5).
        grid: tiles per side (paper: 3).
        tile_frac: side of the random crop inside a cell (paper: 64 / 85).
        min_tile: tiles smaller than this are resized up to it (no-op at paper scale).
    """

    data_parallel = True  # memory bank updated with the global batch; shared negatives (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        out_dim: int = 128,
        temperature: float = 0.07,
        num_negatives: int = 32000,
        bank_momentum: float = 0.5,
        mix: float = 0.5,
        grid: int = 3,
        tile_frac: float = 64 / 85,
        min_tile: int = 16,
    ):
        super().__init__(backbone)
        d = cast(Encoder, backbone).num_features
        self.image_head = nn.Linear(d, out_dim)  # f: image -> 128
        self.tile_head = nn.Linear(d, out_dim)  # each tile -> 128
        self.jigsaw_head = nn.Linear(grid * grid * out_dim, out_dim)  # g: 9 x 128 -> 128
        self.temperature, self.mix = temperature, mix
        self.num_negatives = min(num_negatives, data.num_images)
        self.grid, self.tile_frac, self.min_tile = grid, tile_frac, min_tile
        self.memory = MemoryBank(data.num_images, out_dim, momentum=bank_momentum)  # buffer memory.bank [N, 128]: m_I
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (index, f); not state

    def jigsaw(self, x: torch.Tensor) -> torch.Tensor:
        """g(v_{I^t}): x ``[B, C, S, S]`` -> ``[B, out_dim]``."""
        tiles = jigsaw_tiles(x, self.grid)  # [B, 9, C, t, t]
        tiles, _ = shuffle_tiles(tiles)
        tiles = jitter_crop(tiles, max(1, round(tiles.shape[-1] * self.tile_frac)))
        b, k, c, s, _ = tiles.shape
        flat = tiles.reshape(b * k, c, s, s)  # [9B, C, s, s]
        if s < self.min_tile:
            flat = F.interpolate(flat, size=(self.min_tile, self.min_tile), mode="bilinear", align_corners=False)
        per_tile = self.tile_head(self.backbone(flat))  # [9B, 128]
        return self.jigsaw_head(per_tile.reshape(b, -1))  # [B, 128], tiles in the shuffled order

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        image = batch.views[0]  # [B, C, S, S]
        source = batch.views[1] if len(batch.views) > 1 else image
        f = F.normalize(self.image_head(self.backbone(image)), dim=1)  # [B, 128]
        g = F.normalize(self.jigsaw(source), dim=1)  # [B, 128]
        bank = self.memory.bank  # [N, 128]
        m_pos = bank[batch.index]  # [B, 128]
        m_neg = bank[torch.randint(0, len(bank), (self.num_negatives,), device=bank.device)]  # [M, 128]
        loss_jig = pirl_nce(g, m_pos, m_neg, self.temperature)
        loss_img = pirl_nce(f, m_pos, m_neg, self.temperature)
        self._pending = (batch.index, f.detach())
        return {
            "loss": self.mix * loss_jig + (1 - self.mix) * loss_img,
            "loss_jigsaw": loss_jig.detach(),
            "loss_image": loss_img.detach(),
        }

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        """m_I <- normalize(mom * m_I + (1 - mom) * f(v_I)) for the step's images."""
        if self._pending is None:
            return
        self.memory.update(*self._pending)
        self._pending = None
