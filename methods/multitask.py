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
task gets a disjoint share of the batch (one step costs about one task's step), else
every task sees the whole batch. Logged entries carry the task's name (``rotnet/acc``).
A task that cannot run on the data (a colour-only task on grayscale images) raises
`harness.errors.Unsupported`, and the whole run is skipped with its reason.
"""

from __future__ import annotations

from typing import Callable, Sequence, cast

import torch
from torch import nn

import gin
from harness import dist
from harness.errors import Unsupported
from methods.base import Batch, DataInfo, Method, build_method


def task_name(task: Method) -> str:
    """A task's name in logs: its method file's stem (``rotnet``)."""
    return type(task).__module__.rsplit(".", 1)[-1]


@gin.configurable(module="multitask")
class MultiTask(Method):
    """A weighted sum of pretext losses on one shared backbone.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`), passed on to every task.
        tasks: method classes, e.g. ``[@rotnet.RotNet, @exemplar.Exemplar]``; each is built on
            `backbone` with `data` by `methods.base.build_method`, as the job builds a method.
        weights: one loss weight per task (default: all 1).
        inputs: per task, the indices of the views it reads; None: all views for every task.
        split_batch: each task trains on its own share of the images: task t of k on the images at
            positions t, t + k, ... of the global batch (under data parallel every shard holds its share).
    """

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        tasks: Sequence[Callable[..., Method]] = gin.REQUIRED,
        weights: Sequence[float] | None = None,
        inputs: Sequence[Sequence[int]] | None = None,
        split_batch: bool = True,
    ):
        super().__init__(backbone)
        weights = [1.0] * len(tasks) if weights is None else [float(w) for w in weights]
        if not tasks or len(weights) != len(tasks) or (inputs is not None and len(inputs) != len(tasks)):
            raise ValueError(
                f"multitask.MultiTask: {len(tasks)} tasks need as many weights (got {len(weights)}) "
                f"and inputs (got {'None' if inputs is None else len(inputs)}); fix the gin bindings "
                "multitask.MultiTask.weights / .inputs"
            )
        built = []
        for task in tasks:
            try:
                built.append(build_method(task, backbone, data))
            except Unsupported as err:
                raise Unsupported(f"multitask: task {getattr(task, '__name__', task)}: {err}") from err
        self.tasks = nn.ModuleList(built)
        names = [task_name(t) for t in built]
        self.names = [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]
        self.weights = weights
        self.inputs = None if inputs is None else [list(i) for i in inputs]
        self.split_batch = split_batch
        self.data_parallel = all(cast(Method, t).data_parallel for t in self.tasks)  # when every task's is

    def task_batches(self, batch: Batch) -> list[Batch]:
        """Each task's views (its `inputs`) and, with `split_batch`, its slice of the images."""
        n, k = len(batch.index), len(self.tasks)
        out = []
        for t in range(k):
            views = batch.views if self.inputs is None else [batch.views[i] for i in self.inputs[t]]
            # task t: the images at global batch positions t, t + k, ... (each shard: its share)
            rows = dist.positions(n, batch.index.device) % k == t if self.split_batch else slice(None)
            out.append(Batch(views=[v[rows] for v in views], labels=batch.labels[rows], index=batch.index[rows]))
        return out

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        logs: dict[str, torch.Tensor] = {}
        total: float | torch.Tensor = 0.0
        for name, w, task, sub in zip(self.names, self.weights, self.tasks, self.task_batches(batch)):
            out = cast(Method, task).loss(sub)
            total = total + w * out["loss"]
            logs.update({f"{name}/{k}": v for k, v in out.items()})
        return {"loss": cast(torch.Tensor, total), **logs}  # a tensor: there is at least one task

    def after_step(self, step: int, total: int) -> None:
        """Each task's own updates (banks, queues, EMA targets)."""
        for task in self.tasks:
            cast(Method, task).after_step(step, total)
