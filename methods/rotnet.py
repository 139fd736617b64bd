"""RotNet: Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by
Predicting Image Rotations" (ICLR). Headline: AlexNet conv5 features, ImageNet linear
probe 38.7 % top-1 (Table 5; Goyal 2019 reports 48.9 % for ResNet-50 conv features).

Each image is shown at 0, 90, 180 and 270 degrees in the same batch (the paper found
all four rotations per image better than one random rotation), and a classifier on
the backbone's pooled features predicts which.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

import gin
from methods.base import Batch, DataInfo, Encoder, Method, cross_entropy, mlp


def rotate_all(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All four rotations of a batch. x: [B, C, S, S] -> ([4B, C, S, S], labels [4B])."""
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(len(x))
    return rotated, labels


@gin.configurable(module="rotnet")
class RotNet(Method):
    """Rotation prediction on the shared backbone.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): unused.
        hidden_dim: width of the classifier's hidden layer; 0 for a linear classifier.
    """

    data_parallel = True  # per-image rotation classification (harness/dist.py)

    def __init__(self, backbone: nn.Module, data: DataInfo, *, hidden_dim: int = 0):
        super().__init__(backbone)
        width = cast(Encoder, backbone).num_features
        dims = [width, hidden_dim, 4] if hidden_dim else [width, 4]
        self.classifier = mlp(dims)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x, y = rotate_all(batch.views[0])  # [4B, C, S, S], [4B]
        logits = self.classifier(self.backbone(x))  # [4B, 4]
        return {"loss": cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}
