"""CPC: van den Oord, Li & Vinyals 2018, "Representation Learning with Contrastive
Predictive Coding" (arXiv:1807.03748), as revised by Hénaff, Srinivas, De Fauw, Razavi,
Doersch, Eslami & van den Oord 2020, "Data-Efficient Image Recognition with Contrastive
Predictive Coding" (ICML). Headline: CPC v2, ImageNet linear probe 71.5 % top-1 with a
ResNet-161 and 63.8 % with a ResNet-50 (CPC v1: 48.7 %, ResNet-v2-101).

The image is cut into an overlapping grid of patches (paper: 7x7 patches of 64 px at
stride 32 from 256 px); the shared backbone encodes each patch to a pooled code z; a
PixelCNN-style context network whose output at row i sees only rows <= i summarises
the codes into c; per-offset linear maps predict z_{i+k, j} = W_k c_{i, j} for
k = 1..K, scored by InfoNCE against every patch code in the batch (the other patches
of the same image and of all other images are the negatives).

Hénaff's extras: predictions in all four directions (`directions = 4`: the code grid
is rotated, each direction has its own context network and maps) and per-patch
augmentation (`patch_augment`: a random flip, brightness/contrast jitter and, for RGB,
keeping one random colour channel per patch: a simple stand-in for the paper's
colour dropping plus its AutoAugment-style patch policy). Not reproduced: layer norm
in the encoder (the shared timm backbone keeps its BatchNorm; all patches of a batch
share its statistics). Adaptations: a `patch_size` larger than the image becomes the
paper's geometry (``2 S / (grid + 1)`` px, half-overlapping); K is clipped to
``grid - 1``. The context network's size (`context_blocks`, `context_hidden`) is ours.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, fp32


def patch_grid(x: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """``grid x grid`` patches of ``patch`` px, evenly spaced from edge to edge (stride
    ``(S - patch) / (grid - 1)``, rounded). x: ``[B, C, S, S]`` -> ``[B, grid, grid, C, patch, patch]``."""
    s = x.shape[-1]
    starts = torch.linspace(0, s - patch, grid, device=x.device).round().long()  # [G]
    u = x.unfold(2, patch, 1).unfold(3, patch, 1)  # [B, C, S-p+1, S-p+1, p, p] (a view)
    return u[:, :, starts][:, :, :, starts].permute(0, 2, 3, 1, 4, 5)


@fp32
def info_nce(pred: torch.Tensor, candidates: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE (CPC eq. 4): -log softmax over all candidates of the dot-product scores.

    Args:
        pred: predictions ``[Q, D]``.
        candidates: every code that can be picked ``[N, D]``.
        target: ``[Q]``, the row of `candidates` that is each prediction's true code.
    Returns:
        The mean loss, and the fraction of predictions whose true code scores highest.
    """
    scores = pred @ candidates.T  # [Q, N]
    acc = (scores.detach().argmax(1) == target).float().mean()
    return F.cross_entropy(scores, target), acc


def augment_patches(p: torch.Tensor) -> torch.Tensor:
    """Independent per-patch flip, brightness/contrast jitter and (RGB) colour dropping. p: ``[P, C, h, w]``."""
    n, c = p.shape[:2]
    dev = p.device
    p = torch.where(dist.rand(n, 1, 1, 1, device=dev) < 0.5, p.flip(3), p)
    mean = p.mean((1, 2, 3), keepdim=True)
    contrast = dist.rand(n, 1, 1, 1, device=dev) * 0.8 + 0.6  # [0.6, 1.4]
    shift = dist.rand(n, 1, 1, 1, device=dev) * 0.8 - 0.4  # [-0.4, 0.4] in normalised units
    p = (p - mean) * contrast + mean + shift
    if c == 3:
        keep = dist.randint(0, 3, (n,), device=dev)
        p = p[torch.arange(n, device=dev), keep][:, None].expand(-1, 3, -1, -1)
    return p


class _CausalResidual(nn.Module):
    """1x1 conv, 3x3 conv that sees only rows <= its own, 1x1 conv, residual (PixelCNN-style)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.inp, self.mid = nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, hidden, 3)
        self.out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D, G, G]
        h = F.relu(self.inp(F.relu(x)))
        h = F.relu(self.mid(F.pad(h, (1, 1, 2, 0))))  # pad 2 rows on top only: causal in rows
        return x + self.out(h)


@gin.configurable(module="cpc")
class CPC(Method):
    """CPC on the shared backbone.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): unused.
        grid: patches per side (paper: 7).
        patch_size: patch side in pixels (paper: 64 at 256 px, stride 32).
        steps: K, the farthest row predicted (paper: 5; clipped to ``grid - 1``).
        directions: 1 (top to bottom, CPC v1) or 4 (all four, CPC v2).
        context_blocks: residual blocks of the context network.
        context_hidden: their hidden width (None: a quarter of the code width).
        patch_augment: per-patch augmentation (CPC v2).
    """

    data_parallel = True  # every rank's codes are candidates; patch jitter drawn for the global batch (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        grid: int = 7,
        patch_size: int = 64,
        steps: int = 5,
        directions: int = 4,
        context_blocks: int = 3,
        context_hidden: int | None = None,
        patch_augment: bool = True,
    ):
        super().__init__(backbone)
        if directions not in (1, 2, 4):
            raise ValueError(f"cpc.CPC.directions = {directions}: use 1 (top-down), 2 (and bottom-up) or 4")
        d = cast(Encoder, backbone).num_features
        context_hidden = context_hidden or max(1, d // 4)
        self.grid, self.patch_size, self.directions, self.patch_augment = grid, patch_size, directions, patch_augment
        self.steps = max(1, min(steps, grid - 1))
        self.context = nn.ModuleList(
            nn.Sequential(*[_CausalResidual(d, context_hidden) for _ in range(context_blocks)])
            for _ in range(directions)
        )
        self.predict = nn.ModuleList(
            nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(self.steps)) for _ in range(directions)
        )

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Patch codes of a batch: ``[B, C, S, S]`` -> ``[B, D, G, G]``."""
        b, c, s, _ = x.shape
        p = self.patch_size if self.patch_size <= s else max(1, 2 * s // (self.grid + 1))
        patches = patch_grid(x, self.grid, p).reshape(-1, c, p, p)  # [B*G*G, C, p, p]
        if self.patch_augment and self.training:
            patches = augment_patches(patches)
        z = self.backbone(patches)  # [B*G*G, D]
        return z.view(b, self.grid, self.grid, -1).permute(0, 3, 1, 2)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        z = self.codes(batch.views[0])  # [B, D, G, G]
        b, d, g, _ = z.shape
        losses, accs = [], []
        dev = z.device
        rotations = {1: [0], 2: [0, 2], 4: [0, 1, 2, 3]}[self.directions]
        for r, context, maps in zip(rotations, self.context, self.predict):
            zr = torch.rot90(z, r, dims=(2, 3))  # direction r: predict downwards in the rotated grid
            c = context(zr)  # [B, D, G, G]; row i sees rows <= i
            # every rank's codes are candidates (the global batch's negatives): [W*B*G*G, D], row b*G*G + i*G + j
            cand = dist.gather(zr.permute(0, 2, 3, 1).reshape(-1, d))
            first = dist.world()[0] * b * g * g  # this rank's first row among them
            for k, w in enumerate(cast(nn.ModuleList, maps), start=1):
                pred = w(c[:, :, : g - k].permute(0, 2, 3, 1).reshape(-1, d))  # [B*(G-k)*G, D] from rows i < G-k
                bi, ii, jj = torch.meshgrid(
                    torch.arange(b, device=dev),
                    torch.arange(g - k, device=dev),
                    torch.arange(g, device=dev),
                    indexing="ij",
                )
                target = first + (bi * g * g + (ii + k) * g + jj).reshape(-1)  # [B*(G-k)*G] the code at row i + k
                loss, acc = info_nce(pred, cand, target)
                losses.append(loss)
                accs.append(acc)
        return {"loss": torch.stack(losses).mean(), "acc": torch.stack(accs).mean()}
