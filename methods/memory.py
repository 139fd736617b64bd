"""State that outlives a step, kept in buffers so the trainer checkpoints it.

Two helpers shared by the instance-discrimination methods:

- `MemoryBank`: one L2-normalised feature per pretraining image, updated by momentum
  at the images a step saw (NPID: Wu et al. 2018, "Unsupervised Feature Learning via
  Non-Parametric Instance Discrimination", CVPR, sec. 3.2; PIRL reuses it).
- `Queue`: a first-in first-out ring of the most recent keys (MoCo: He et al. 2020,
  "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR, sec. 3.2).

Both start as random points on the unit sphere, as the papers' code does, and change
only through `update` / `push`, which the methods call from `after_step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness import dist


def random_unit(n: int, dim: int) -> torch.Tensor:
    """``n`` points drawn uniformly on the unit sphere in ``dim`` dimensions (global RNG). ``[n, dim]``"""
    return F.normalize(torch.randn(n, dim), dim=1)


class MemoryBank(nn.Module):
    """A feature per image: ``v_i <- normalise(m * v_i + (1 - m) * f_i)`` when image i is seen.

    Args:
        size: number of pretraining images (the bank is indexed by `Batch.index`).
        dim: feature width.
        momentum: weight ``m`` of the stored feature (NPID: 0.5).
    """

    bank: torch.Tensor

    def __init__(self, size: int, dim: int, momentum: float = 0.5):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("bank", random_unit(size, dim))  # [N, D]

    def __len__(self) -> int:
        return len(self.bank)

    @torch.no_grad()
    def update(self, index: torch.Tensor, feats: torch.Tensor) -> None:
        """Mixes `feats` (``[B, D]``) into the rows at `index` (``[B]``, distinct) and re-normalises them;
        under data parallel, every rank's (`harness.dist`): each rank's bank holds the global batch's update."""
        index, feats = dist.gather_detached(index), dist.gather_detached(feats)  # [W * B], [W * B, D]
        mixed = self.momentum * self.bank[index] + (1 - self.momentum) * feats.to(self.bank.dtype)  # [B, D]
        self.bank[index] = F.normalize(mixed, dim=1)


class Queue(nn.Module):
    """A ring buffer of the ``size`` most recent keys; the oldest are overwritten first.

    Attributes:
        keys: ``[size, D]`` (order in the ring does not matter to a contrastive loss).
        ptr: the slot the next key is written to (a 0-d int64 buffer).
    """

    keys: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"a queue needs at least one slot, got size = {size}")
        self.register_buffer("keys", random_unit(size, dim))  # [K, D]
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return len(self.keys)

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Enqueues `keys` (``[B, D]``, oldest first) and drops as many of the oldest; wraps around the end.
        Under data parallel every rank's keys, in rank order (`harness.dist`): the global batch's."""
        keys = dist.gather_detached(keys)  # [W * B, D]
        size = len(self.keys)
        keys = keys[-size:].to(self.keys.dtype)  # a batch larger than the queue keeps its newest keys
        slots = (self.ptr + torch.arange(len(keys), device=self.keys.device)) % size  # [B]
        self.keys[slots] = keys
        self.ptr.copy_((self.ptr + len(keys)) % size)
