"""Supervised baseline: cross-entropy on the labels, the upper reference of every
table (He et al. 2016 for ResNet; 76.5 % top-1 for ResNet-50 on ImageNet as trained
in Goyal et al. 2019's benchmark).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

import gin
from methods.base import Batch, DataInfo, Encoder, Method, cross_entropy


@gin.configurable(module="supervised")
class Supervised(Method):
    """A linear classifier on the backbone, trained with labels.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``num_classes`` (the classifier's width).
        label_smoothing: cross-entropy label smoothing.
    """

    data_parallel = True  # per-sample cross-entropy: each shard's mean (harness/dist.py)

    def __init__(self, backbone: nn.Module, data: DataInfo, *, label_smoothing: float = 0.0):
        super().__init__(backbone)
        self.classifier = nn.Linear(cast(Encoder, backbone).num_features, data.num_classes)
        self.label_smoothing = label_smoothing

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        logits = self.classifier(self.backbone(batch.views[0]))  # [B, classes]
        loss = cross_entropy(logits, batch.labels, label_smoothing=self.label_smoothing)
        return {"loss": loss, "acc": (logits.argmax(1) == batch.labels).float().mean()}
