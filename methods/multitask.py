"""Multi-task self-supervision: Doersch & Zisserman 2017, "Multi-task Self-Supervised Visual
Learning" (ICCV). Their combination is relative position + colorization + exemplar + motion
segmentation on one ResNet-101 trunk, evaluated on ImageNet, PASCAL VOC and NYU depth.

Several pretext methods train ONE shared backbone: each task is an existing method
(`methods/<task>.py`) built on the same backbone object with its own heads and state, and
the loss is the weighted sum of the tasks' losses (the paper's "naive" multi-head
network; its lasso layer-mixing and input harmonisation are not reproduced).

Views: the gin file declares the union of every task's views (`views.Views`), and
`inputs` says which of them each task reads, in its own order (e.g. RotNet ``[0]``,
Exemplar ``[1, 2]``); None gives every task all views. Images: the paper trained each
task on its own workers, so each task saw its own images; with ``split_batch`` each
task gets a disjoint slice of the batch (one step costs about one task's step), else
every task sees the whole batch. Logged entries carry the task's name (``rotnet/acc``).
A task that cannot run on the data (a colour-only task on grayscale images) raises
`methods.base.Unsupported`, and the whole run is skipped with its reason.
"""
from __future__ import annotations

from typing import Callable, Sequence

import gin
import torch
from torch import nn

from harness.job import _build_method
from methods.base import Batch, Method, Unsupported


class _DataFacts:
    """What `harness.job._build_method` reads from the pretraining data, for building tasks."""

    def __init__(self, num_classes: int, num_images: int, channels: int, captions: Sequence[str] | None,
                 mean: Sequence[float], std: Sequence[float]):
        self.classes, self.num_images = [""] * num_classes, num_images
        self.channels, self.captions, self.mean, self.std = channels, captions, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return self.num_images


def task_name(task: Method) -> str:
    """A task's name in logs: its method file's stem (``rotnet``)."""
    return type(task).__module__.rsplit(".", 1)[-1]


@gin.configurable(module="multitask")
class MultiTask(Method):
    """A weighted sum of pretext losses on one shared backbone.

    Args:
        backbone: the shared timm encoder.
        tasks: method classes, e.g. ``[@rotnet.RotNet, @exemplar.Exemplar]``; each is built on
            `backbone` with the data facts its constructor takes, as the job builds a method.
        weights: one loss weight per task (default: all 1).
        inputs: per task, the indices of the views it reads; None: all views for every task.
        split_batch: each task trains on its own disjoint slice of the batch.
        num_classes, num_images, channels, captions, mean, std: the pretraining data's (the job
            passes them; each task gets those its constructor takes).
    """

    def __init__(self, backbone: nn.Module, tasks: Sequence[Callable[..., Method]] = gin.REQUIRED,
                 weights: Sequence[float] | None = None, inputs: Sequence[Sequence[int]] | None = None,
                 split_batch: bool = True, num_classes: int = 0, num_images: int = 0, channels: int = 3,
                 captions: Sequence[str] | None = None, mean: Sequence[float] = (0.5,),
                 std: Sequence[float] = (0.5,)):
        super().__init__(backbone)
        weights = [1.0] * len(tasks) if weights is None else [float(w) for w in weights]
        if not tasks or len(weights) != len(tasks) or (inputs is not None and len(inputs) != len(tasks)):
            raise ValueError(f"multitask.MultiTask: {len(tasks)} tasks need as many weights (got {len(weights)}) "
                             f"and inputs (got {'None' if inputs is None else len(inputs)}); fix the gin bindings "
                             "multitask.MultiTask.weights / .inputs")
        facts = _DataFacts(num_classes, num_images, channels, captions, mean, std)
        built = []
        for task in tasks:
            try:
                built.append(_build_method(task, backbone, facts))
            except Unsupported as err:
                raise Unsupported(f"multitask: task {getattr(task, '__name__', task)}: {err}") from err
        self.tasks = nn.ModuleList(built)
        names = [task_name(t) for t in built]
        self.names = [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]
        self.weights = weights
        self.inputs = None if inputs is None else [list(i) for i in inputs]
        self.split_batch = split_batch

    def task_batches(self, batch: Batch) -> list[Batch]:
        """Each task's views (its `inputs`) and, with `split_batch`, its slice of the images."""
        n, k = len(batch.index), len(self.tasks)
        out = []
        for t in range(k):
            views = batch.views if self.inputs is None else [batch.views[i] for i in self.inputs[t]]
            rows = slice(t * n // k, (t + 1) * n // k) if self.split_batch else slice(None)
            out.append(Batch(views=[v[rows] for v in views], labels=batch.labels[rows], index=batch.index[rows]))
        return out

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        logs: dict[str, torch.Tensor] = {}
        total = 0.0
        for name, w, task, sub in zip(self.names, self.weights, self.tasks, self.task_batches(batch)):
            out = task.loss(sub)
            total = total + w * out["loss"]
            logs.update({f"{name}/{k}": v for k, v in out.items()})
        return {"loss": total, **logs}

    def after_step(self, step: int, total: int) -> None:
        """Each task's own updates (banks, queues, EMA targets)."""
        for task in self.tasks:
            task.after_step(step, total)
