"""Random baseline: the untrained backbone, as in every SSL paper's lower reference
(e.g. Goyal et al. 2019, "Scaling and Benchmarking Self-Supervised Visual
Representation Learning", Table 2 "Random").

Choices made here:
- BatchNorm running statistics are recomputed on training images (cumulative average
  over `calibration_steps` batches of the pretraining views, no gradient). Without
  that, BN would normalise with the initial mean 0 / variance 1 and the features
  would mostly measure the input scale rather than the random network.
- BatchNorm scales are set to 1. timm zero-initialises the last BN of each residual
  block (a trick that helps *training*, Goyal et al. 2017); left at zero, every
  residual branch of an untrained network is switched off and "random" would measure
  a stem plus shortcuts (28 % kNN on Fashion-MNIST instead of 76 %, measured).
"""

from __future__ import annotations

import torch
from torch import nn

import gin
from methods.base import Batch, DataInfo, Method


@gin.configurable(module="random")
class Random(Method):
    """Untrained encoder with recalibrated BatchNorm statistics.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): unused.
        calibration_steps: batches used to estimate BatchNorm statistics.
    """

    data_parallel = True  # no loss; BatchNorm statistics of the global batch (sync_bn, harness/dist.py)

    def __init__(self, backbone: nn.Module, data: DataInfo, *, calibration_steps: int = 50):
        super().__init__(backbone)
        self.pretrain_steps = calibration_steps
        for p in self.parameters():
            p.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    nn.init.ones_(m.weight)
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average over all calibration batches

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self.backbone(batch.views[0])  # train mode: updates BN running statistics
        return {"loss": torch.zeros(())}
