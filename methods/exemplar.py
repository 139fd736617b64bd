"""Exemplar-CNN: Dosovitskiy, Springenberg, Riedmiller & Brox 2014, "Discriminative
Unsupervised Feature Learning with Convolutional Neural Networks" (NIPS); extended in
Dosovitskiy, Fischer, Springenberg, Riedmiller & Brox 2016, "Discriminative
Unsupervised Feature Learning with Exemplar Convolutional Neural Networks" (TPAMI).
The papers report no ImageNet number; headline: STL-10, 64c5-128c5-256c5-512f network,
72.8 % top-1 with a linear SVM on pooled features (NIPS 2014).

N "seed" images each define a surrogate class; the network learns to classify heavily
transformed versions of a seed (translation, scaling, rotation, contrast, colour) as
its class with a parametric N-way softmax classifier.

How the surrogate set is formed here: at construction, N = min(`num_surrogate`,
`num_images`) seed indices are drawn once (a permutation from torch's global RNG, so
a function of the run's seed) and stored as a buffer mapping image index -> class
(-1: not a seed). A batch's images that are seeds, in every view the gin file
declares, are the training samples; the others are dropped before the backbone runs.
Simplifications, stated: the paper samples 32x32 patches at regions of strong
gradient, here a seed is a whole image; the transformations are the shared
`views.Augment` ones (crop-scale, colour and contrast), without rotation; each visit draws two
transformations of a seed (the paper's batches mix random members of the N x K
surrogate set), so every visit trains on a pair.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

import gin
from methods.base import Batch, DataInfo, Encoder, Method, cross_entropy


def surrogate_labels(classes: torch.Tensor, index: torch.Tensor, num_views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples of a batch are seeds, and their surrogate classes.

    Args:
        classes: image index -> surrogate class, -1 for images that are not seeds, ``[num_images]``.
        index: the batch's image indices, ``[B]``.
        num_views: views per image, stacked view-major (``[V*B]`` samples).
    Returns:
        ``(keep [V*B] bool, labels [K] int64)`` with K the number of kept samples.
    """
    y = classes[index].repeat(num_views)  # [V*B]
    keep = y >= 0
    return keep, y[keep]


@gin.configurable(module="exemplar")
class Exemplar(Method):
    """Parametric classification of N seed images under heavy augmentation.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``num_images`` (one surrogate class at most per image).
        num_surrogate: surrogate classes N (paper: 8000 to 32000); clipped to `num_images`.
    """

    surrogate_class: torch.Tensor

    data_parallel = True  # per-image surrogate-class cross-entropy (harness/dist.py)

    def __init__(self, backbone: nn.Module, data: DataInfo, *, num_surrogate: int = 8000):
        super().__init__(backbone)
        num_images = data.num_images
        n = min(num_surrogate, num_images)
        classes = torch.full((num_images,), -1, dtype=torch.long)
        classes[torch.randperm(num_images)[:n]] = torch.arange(n)
        self.register_buffer("surrogate_class", classes)  # [num_images]
        self.classifier = nn.Linear(cast(Encoder, backbone).num_features, n)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        keep, y = surrogate_labels(self.surrogate_class, batch.index, len(batch.views))  # [V*B], [K]
        if int(y.numel()) < 2:  # no seed here (BatchNorm needs two samples): a zero loss keeps the graph
            zero = cast(torch.Tensor, sum(p.sum() for p in self.parameters() if p.requires_grad)) * 0.0
            return {"loss": zero, "acc": zero.detach(), "seeds": zero.detach()}
        x = torch.cat(batch.views)[keep]  # [K, C, S, S]
        logits = self.classifier(self.backbone(x))  # [K, N]
        loss = cross_entropy(logits, y)
        return {"loss": loss, "acc": (logits.argmax(1) == y).float().mean(), "seeds": torch.tensor(float(y.numel()))}
