"""MoCo: He, Fan, Wu, Xie & Girshick 2020, "Momentum Contrast for Unsupervised Visual
Representation Learning" (CVPR), and MoCo v2: Chen, Fan, Girshick & He 2020, "Improved
Baselines with Momentum Contrastive Learning" (arXiv 2003.04297). Headline: ResNet-50,
200 epochs, ImageNet linear probe 60.6 % top-1 (v1) and 67.5 % (v2; 71.1 % at
800 epochs). One class; ``gin/methods/moco_v1.gin`` and ``moco.gin`` (v2)
differ only in settings (head, tau, augmentation, schedule).

A query encoder (backbone + head) and a key encoder, its exponential moving average
(m = 0.999, updated in `after_step`, never exported). InfoNCE (eq. 1) classifies each
query's positive key (logit index 0) against a queue of K keys from earlier batches;
the batch's keys are enqueued after the step, the oldest dropped.

Queue size: K = 65,536 in the paper, 5 % of ImageNet, so a query's own earlier key is
rarely among its negatives. A queue as large as the pretraining set would, once full,
always hold one; K is clipped to half the set, ``min(K, num_images // 2)`` (K + B <= N for any batch
up to half the data). It starts as random unit vectors, as in the paper's code. At the
embedded scale (10,000 pretraining images, 3 epochs, 234 steps of 128) the clip alone
would give 5,000 keys; that scale binds ``moco.MoCo.queue_size = 4096``, which real keys
fill in 32 steps, so from then on every step contrasts against the keys of the 32 batches
before it, none random.

Shuffling BN (sec. 3.3). On 8 GPUs each GPU normalises its own 32 queries, and the
keys are computed after a random shuffle of the batch across GPUs, so the BN statistics
of a query and of its positive key come from different subsets: the model cannot find
its positive from the batch statistics it shares with it. On one device we do the
same: the queries are split, in order, into `bn_splits` equal sub-batches (fewer when
the batch does not divide) that BatchNorm normalises separately, and the keys are
permuted by a random permutation (torch's global RNG), split the same way, encoded,
and un-permuted. A query's BN subset is its position block; its key's is a random
one, as with GPUs. The sub-batches go through one forward pass, BatchNorm folding them
into channels (`split_forward`), which on CPU is ~3x faster than a forward per
sub-batch and gives the same outputs. The key encoder's BatchNorm keeps no running
statistics (MoCo never runs it in eval mode), so computing keys in `loss` changes no
state; the query backbone's running statistics move towards the mean of the
sub-batches' statistics once per step (with DDP they follow GPU 0's sub-batch).
"""

from __future__ import annotations

import copy
import functools
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, fp32, mlp
from methods.memory import Queue


@fp32
def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo eq. 1: cross-entropy with the positive at logit index 0.

    Args:
        q: queries, ``[B, D]``, L2-normalised.
        k: their positive keys, ``[B, D]``, L2-normalised.
        queue: negative keys, ``[K, D]``, L2-normalised.
        temperature: tau.
    """
    pos = (q * k).sum(1, keepdim=True)  # [B, 1]
    neg = q @ queue.T  # [B, K]
    logits = torch.cat([pos, neg], 1) / temperature  # [B, 1 + K]
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _grouped_bn(bn: nn.modules.batchnorm._BatchNorm, splits: int, x: torch.Tensor) -> torch.Tensor:
    """`bn` in training mode with statistics per sub-batch: the G sub-batches are folded into
    channels (``[B, C, *] -> [B/G, G*C, *]``) so one fused batch-norm call normalises each alone;
    the running statistics move towards the mean of the sub-batches' statistics."""
    if not bn.training:
        return type(bn).forward(bn, x)
    b, c, rest = len(x), x.shape[1], x.shape[2:]
    folded = x.reshape(splits, b // splits, c, *rest).transpose(0, 1).reshape(b // splits, splits * c, *rest)
    track = bn.track_running_stats and bn.running_mean is not None
    # with `track` the running statistics exist (torch types them as optional)
    running_mean, running_var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
    tracked = cast(torch.Tensor, bn.num_batches_tracked)
    mean, var = (running_mean.repeat(splits), running_var.repeat(splits)) if track else (None, None)
    momentum = 0.0 if not track else bn.momentum if bn.momentum is not None else 1 / (float(tracked) + 1)
    weight, bias = (bn.weight.repeat(splits), bn.bias.repeat(splits)) if bn.affine else (None, None)
    y = F.batch_norm(folded, mean, var, weight, bias, True, momentum, bn.eps)  # [B/G, G*C, *]
    if track:
        with torch.no_grad():
            tracked.add_(1)
            groups = splits * dist.world()[1]  # every rank's sub-batches
            running_mean.copy_(dist.all_reduce_sum(cast(torch.Tensor, mean).view(splits, c).sum(0)) / groups)
            running_var.copy_(dist.all_reduce_sum(cast(torch.Tensor, var).view(splits, c).sum(0)) / groups)
    return y.reshape(b // splits, splits, c, *rest).transpose(0, 1).reshape(x.shape)


def split_forward(net: nn.Module, x: torch.Tensor, splits: int) -> torch.Tensor:
    """``net`` on `splits` consecutive sub-batches of `x`, each normalised by its own BN statistics.

    Plain BatchNorm layers do it in one forward (`_grouped_bn`); any other normalisation
    layer falls back to one forward per sub-batch (same result, slower on CPU).
    """
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if splits == 1 or not bns:
        return net(x)
    if len(x) % splits or any(type(m) not in _PLAIN_BN for m in bns):
        return torch.cat([net(part) for part in x.chunk(splits)])
    for m in bns:
        m.forward = functools.partial(_grouped_bn, m, splits)  # type: ignore[method-assign]  # patched for one call
    try:
        return net(x)
    finally:
        for m in bns:
            del m.forward


def _drop_running_stats(net: nn.Module) -> None:
    """BatchNorm layers that always use batch statistics and store none (no side effects in forward)."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None


@gin.configurable(module="moco")
class MoCo(Method):
    """Momentum contrast with a queue of keys.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``num_images`` (the queue is clipped to half of them).
        out_dim: feature width (paper: 128).
        hidden_dim: MLP head hidden width (v2: 2048); 0 for v1's linear head.
        temperature: tau (v1: 0.07, v2: 0.2).
        queue_size: K (paper: 65536), clipped to ``num_images // 2``.
        momentum: key encoder EMA m (paper: 0.999).
        bn_splits: sub-batches for shuffled BN (paper: 8 GPUs); 1 turns shuffling off.
    """

    data_parallel = True  # the global batch's keys queued, shuffled across ranks (harness/dist.py)
    sync_bn = False  # shuffled BN: each sub-batch (the paper's GPU) its own statistics

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        out_dim: int = 128,
        hidden_dim: int = 2048,
        temperature: float = 0.2,
        queue_size: int = 65536,
        momentum: float = 0.999,
        bn_splits: int = 8,
    ):
        super().__init__(backbone)
        width = cast(Encoder, backbone).num_features
        dims = [width, hidden_dim, out_dim] if hidden_dim else [width, out_dim]
        self.head = mlp(dims, batch_norm=False)  # v2: fc-ReLU-fc; v1: one fc
        self.key_encoder = nn.Sequential(copy.deepcopy(backbone), copy.deepcopy(self.head)).requires_grad_(False)
        _drop_running_stats(self.key_encoder)
        self.queue = Queue(max(1, min(queue_size, data.num_images // 2)), out_dim)
        self.temperature, self.momentum, self.bn_splits = temperature, momentum, bn_splits
        self._keys: torch.Tensor | None = None  # this step's keys, enqueued in after_step

    def _splits(self, batch: int, world: int) -> int:
        """Sub-batches of the global `batch` (the paper's GPUs): at most `bn_splits`, >= 2 images each,
        dividing the batch, a multiple of the processes (each rank normalises its own sub-batches)."""
        fits = [s for s in range(1, min(self.bn_splits, batch // 2) + 1) if batch % s == 0 and s % world == 0]
        if not fits:
            raise ValueError(
                f"moco.MoCo.bn_splits = {self.bn_splits}: the global batch of {batch} cannot be split into BatchNorm "
                f"sub-batches of >= 2 images that {world} processes share evenly. Fix: bind moco.MoCo.bn_splits to a "
                f"multiple of {world}"
            )
        return max(fits)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        xq, xk = batch.views[:2]  # [B, C, S, S] each
        world = dist.world()[1]
        local = self._splits(len(xq) * world, world) // world  # this rank's sub-batches
        q = F.normalize(split_forward(nn.Sequential(self.backbone, self.head), xq, local), dim=1)  # [B, D]
        with torch.no_grad():  # shuffle the global batch, encode each rank's sub-batches, unshuffle
            xk_all = dist.gather_detached(xk)  # [W * B, C, S, S]
            perm = torch.randperm(len(xk_all), device=xk.device)  # the same on every rank
            mine = dist.local_rows(len(xk_all))
            k = F.normalize(split_forward(self.key_encoder, xk_all[perm][mine], local), dim=1)  # [B, D]
            k = dist.gather_detached(k)[torch.argsort(perm)][mine]  # [B, D]: the keys of this rank's images
        loss = info_nce(q, k, self.queue.keys, self.temperature)
        self._keys = k
        with torch.no_grad():
            acc = ((q * k).sum(1) > (q @ self.queue.keys.T).amax(1)).float().mean()  # positive ranks first
        return {"loss": loss, "acc": acc}

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        """Key encoder <- m * key + (1 - m) * query; then the step's keys join the queue."""
        query = list(self.backbone.parameters()) + list(self.head.parameters())
        for pk, pq in zip(self.key_encoder.parameters(), query, strict=True):
            pk.mul_(self.momentum).add_(pq.detach(), alpha=1 - self.momentum)
        if self._keys is not None:
            self.queue.push(self._keys)
            self._keys = None
