"""Pixels baseline: raw pixels, no network. The evaluation sees the normalised
evaluation view flattened (``[N, C*S*S]``), the floor any learned feature should beat
on a linear probe (e.g. Coates & Ng 2011 report raw-pixel baselines on CIFAR).
"""

from __future__ import annotations

import torch
from torch import nn

import gin
from methods.base import Batch, DataInfo, Method


@gin.configurable(module="pixels")
class Pixels(Method):
    """Identity features; nothing is trained and no backbone is exported."""

    pretrain_steps = 0

    data_parallel = True  # no weights, no training

    def __init__(self, backbone: nn.Module, data: DataInfo):
        super().__init__(backbone)
        self.flatten = nn.Flatten()

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise RuntimeError("pixels has nothing to pretrain")

    def encoder(self) -> nn.Module:
        return self.flatten
