"""The Method seam (DESIGN.md): a module that owns its heads and state, and a loss.

The trainer owns devices, precision, optimizers and schedules; a method only says
what its loss is and what to update after each step (EMA, queues, banks).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn


class Unsupported(ValueError):
    """Raised by a method's constructor when it cannot run on the data (e.g. a colour-only
    method on grayscale images). The run is recorded as ``skipped`` with this message as
    the reason, and the leaderboard shows it instead of numbers."""


@dataclasses.dataclass
class Batch:
    """What the loader hands a method.

    Attributes:
        views: the views declared in the method's gin file, each float ``[B, C, S, S]``.
        labels: int64 ``[B]`` (only baselines and evaluations may read them).
        index: int64 ``[B]`` positions in the pretraining set (memory banks).
    """

    views: list[torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor


class Method(nn.Module):
    """Base class: one level of inheritance at most.

    Attributes:
        pretrain_steps: steps this method trains for, when it differs from the
            trainer's schedule (``0``: no pretraining at all).
    """

    pretrain_steps: int | None = None

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"loss": scalar, ...}``; extra entries are logged."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The loss; lets DistributedDataParallel wrap a method and average its gradients."""
        return self.loss(batch)

    def after_step(self, step: int, total: int) -> None:
        """Updates that follow the optimizer step (EMA targets, queues, banks)."""

    def encoder(self) -> nn.Module:
        """The network evaluated after pretraining (the backbone unless stated)."""
        return self.backbone


def mlp(dims: Sequence[int], batch_norm: bool = True, last_bn: bool = False) -> nn.Sequential:
    """An MLP head: Linear(-BN)-ReLU blocks, a plain Linear last (SimCLR / MoCo v2 style).

    Args:
        dims: ``[in, hidden, ..., out]``.
        batch_norm: BatchNorm after each hidden Linear.
        last_bn: BatchNorm (no affine) after the last Linear (SimCLR v2, BYOL variants).
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=not (batch_norm and not last)))
        if not last:
            layers += [nn.BatchNorm1d(b)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)
