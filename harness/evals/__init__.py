"""Evaluation protocols: small modules, each `(train, test) -> dict[str, float]`.

Every protocol is a gin-configured object with a `name` (e.g. ``knn/npid``) and a
`params()` dict; both, and an id hashing them (`harness.evals.protocol`), are stored
beside its numbers in ``run.json``. Protocols on frozen features share one extraction
per (encoder, dataset split): see `Features`; the others get a `Context`.
docs/protocols.md lists the protocols, their papers and the settings they pin.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from harness.data import Dataset


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


@dataclasses.dataclass
class Context:
    """What a protocol that needs more than frozen features gets (fine-tuning, detection,
    zero-shot). Such a protocol sets ``frozen = False`` and implements
    ``evaluate(ctx: Context) -> dict[str, float]``; frozen-feature protocols are called as
    ``protocol(train, test)`` instead.

    Attributes:
        encoder: returns a fresh copy of the exported encoder on each call (fine-tuning one
            copy never changes what another protocol sees).
        dataset: the run's dataset object (``split("train")``, ``split("test")``).
        pretrain_dir: the pretraining folder (exported encoder, anything a method exported).
        features: the run's frozen features, ``{"train": Features, "test": Features}``.
        device: where to compute.
        seed: the run's seed (for subset draws and initialisation).
        progress: show progress bars.
    """

    encoder: Callable[[], torch.nn.Module]
    dataset: Dataset
    pretrain_dir: Path
    features: dict[str, Features]
    device: torch.device | str = "cpu"
    seed: int = 0
    progress: bool = True
