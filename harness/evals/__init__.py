"""Evaluation protocols: small modules, each `(train, test) -> dict[str, float]`.

Every protocol is a gin-configured object with a `name` (e.g. ``knn/npid``) and a
`params()` dict; both are stored beside its numbers in ``run.json``. Protocols on
frozen features share one extraction per (encoder, dataset split): see `Features`.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Features:
    """Frozen features of one dataset split.

    Attributes:
        x: features, float32 ``[N, D]``.
        y: integer class labels, int64 ``[N]``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"Features need x [N, D] and y [N]; got {tuple(self.x.shape)} and {tuple(self.y.shape)}")

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1
