"""Collectives for losses that compare the samples of a data-parallel batch.

Under DistributedDataParallel each rank holds a shard of the global batch. A loss that
compares samples (contrastive negatives, a cross-correlation, BatchNorm's statistics)
computed on the shard alone is another loss: at 64 ranks SimCLR would contrast 127
negatives instead of 8,190. The rule every method follows (tests/test_ddp_losses.py):

* each rank's loss is its shard's share of the global batch's loss, so that the mean over
  ranks is the one-process loss of the global batch (a per-sample mean over the shard, or
  the global loss itself);
* every dependency on another rank's samples goes through an autograd-aware collective
  (`gather`, `all_reduce_sum`), whose backward sums each rank's gradient contributions.
  DDP then averages the ranks' gradients, which gives the one-process gradient.

`GlobalBatchNorm` normalises with the global batch's statistics on any device (torch's
SyncBatchNorm runs on GPUs only): the trainer swaps it in on CPU for methods whose paper
synchronises BatchNorm (`Method.sync_bn`). Outside a process group every function is the
identity, so one process is unchanged. Random draws inside a loss (`rand`, `randn`,
`randint`, `randn_like`) are made for the global batch on every rank and sliced, as the
trainer draws the views: ranks stay in step and follow the one-process draws.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
from torch import nn


class _Gather(torch.autograd.Function):
    """all_gather whose backward sums the ranks' gradients and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rank = dist.get_rank()
        return grad[rank * ctx.rows : (rank + 1) * ctx.rows]


class _AllReduceSum(torch.autograd.Function):
    """all_reduce (sum) whose backward sums the ranks' gradients (the sum's Jacobian is ones)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, or ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` concatenated in rank order along dim 0 (``[W * B, ...]``), differentiable:
    the backward sums each rank's gradient for this rank's rows."""
    if world()[1] == 1:
        return x
    return cast(torch.Tensor, _Gather.apply(x))


@torch.no_grad()
def gather_detached(x: torch.Tensor) -> torch.Tensor:
    """`gather` without gradient (keys for a queue, features for a memory bank)."""
    if world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks, differentiable (the backward sums the ranks' gradients)."""
    if world()[1] == 1:
        return x
    return cast(torch.Tensor, _AllReduceSum.apply(x))


def local_rows(n: int) -> slice:
    """This rank's rows of a global batch of `n` gathered in rank order (`gather`)."""
    rank, size = world()
    return slice(rank * n // size, (rank + 1) * n // size)


def positions(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The global batch positions of this rank's `n` rows: ``rank * n + arange(n)``; a method that
    splits its batch by role (split-brain's halves, multi-task's slices) splits by these, so each
    shard holds its share of every role, as one process's batch does."""
    return torch.arange(n, device=device) + world()[0] * n


def _local(draw, size: tuple[int, ...], dim: int, **kw) -> torch.Tensor:
    """`draw` for the global batch (``size[dim]`` times the world size), this rank's rows of it: every
    rank draws the same numbers (their RNGs stay in step) and a run's draws equal one process's."""
    rank, size_w = world()
    if size_w == 1:
        return draw(size, **kw)
    full = list(size)
    full[dim] *= size_w
    return draw(tuple(full), **kw).narrow(dim, rank * size[dim], size[dim])


def rand(*size: int, dim: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.rand(size)`` for this rank's shard of the global batch (batch along `dim`)."""
    return _local(lambda s, **kw: torch.rand(s, **kw), size, dim, device=device)


def randn(*size: int, dim: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.randn(size)`` for this rank's shard of the global batch (batch along `dim`)."""
    return _local(lambda s, **kw: torch.randn(s, **kw), size, dim, device=device)


def randn_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.randn_like(x)`` for this rank's shard (batch along dim 0)."""
    return _local(lambda s, **kw: torch.randn(s, **kw), tuple(x.shape), 0, device=x.device, dtype=x.dtype)


def randint(
    low: int, high: int, size: tuple[int, ...], dim: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """``torch.randint(low, high, size)`` for this rank's shard of the global batch (batch along `dim`)."""
    return _local(lambda s, **kw: torch.randint(low, high, s, **kw), tuple(size), dim, device=device)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are the global batch's (all ranks), on any device.

    Two-pass: the global mean, then the global mean squared deviation, each a
    differentiable `all_reduce_sum`, so the output and its gradient equal one process's
    BatchNorm on the whole batch up to summation order. Running statistics take the global
    mean and the unbiased global variance, as torch's BatchNorm does.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects [B, C, ...] input, got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or world()[1] == 1:
            return super().forward(x)
        dtype = x.dtype  # statistics in float32 under bf16 autocast, as SyncBatchNorm keeps them (float64 stays)
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = all_reduce_sum(torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device))  # [1]
        mean = all_reduce_sum(x.sum(dims)) / count  # [C]
        var = all_reduce_sum(((x - mean.view(shape)) ** 2).sum(dims)) / count  # [C], biased
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
                momentum = (
                    1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum  # type: ignore[arg-type]
                )
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(dtype)


def convert_global_bn(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm replaced, in place, by a `GlobalBatchNorm` holding the
    same parameters and buffers (returns the root, replaced too when it is a BatchNorm)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_global_bn(child))
    return module
