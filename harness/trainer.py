"""The trainer: devices, optimizer, schedule, checkpoints, resume, logging.

Determinism: the batch order is a pure function of (seed, step), augmentations and
methods draw from torch's global RNG, and every checkpoint stores the step, the
method, the optimizer and the RNG states; on CPU a resumed run ends with exactly the
weights of an uninterrupted one (tests/test_trainer.py).

Data parallel: inside an initialised process group (several tasks of a SLURM job, or
any torch.distributed launch), the method is wrapped in DistributedDataParallel and
each rank trains on its shard of the global batch. In-memory data: views are drawn for
the whole batch on every rank, so a run on N processes follows a one-process run's
trajectory (tests/test_ddp.py, gloo on CPU). Image files: each rank decodes and crops
only its shard, in worker processes (`harness.data.pipeline`), so a run is
deterministic per world size (tests/test_pipeline.py). A method runs on several processes only once its loss is
the global batch's (``Method.data_parallel``; harness/dist.py, tests/test_ddp_losses.py);
BatchNorm takes the global batch's statistics where the paper synchronises it
(``Method.sync_bn``): SyncBatchNorm on GPUs, `harness.dist.GlobalBatchNorm` on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Generator, cast

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import gin
from harness import dist as dist_lib
from harness import store
from harness.curves import Curves
from harness.data import ImageSet
from harness.data.pipeline import Pipeline, file_backed
from harness.optim import (  # noqa: F401
    PRECISIONS,
    Kernel,
    NonFiniteLoss,
    batch_indices,
    param_groups,
    resolve_device,
    scaled_lr,
)
from harness.views import Views
from methods.base import Batch, Method

# Preemption (SLURM or submitit's local executor send SIGUSR2): the launcher routes the
# signal here, so the checkpoint is saved at a step boundary, never mid-step.
_training = False
_pending: Callable[[], None] | None = None


def defer_while_training(handler: Callable[[int, object], None]) -> Callable[[int, object], None]:
    """Wraps a signal handler: while a trainer is inside a step, it runs after the step's
    checkpoint is saved; otherwise at once."""

    def wrapped(signum: int, frame: object) -> None:
        global _pending
        if _training:
            _pending = functools.partial(handler, signum, frame)
        else:
            handler(signum, frame)

    return wrapped


class Interrupted(RuntimeError):
    """Raised after `stop_after` steps (used to test and exercise resume)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())  # the legacy tuple
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor(np_state[2]),
        "python": torch.tensor(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


distributed = dist_lib.world  # ``(rank, world size)``, or ``(0, 1)`` outside a process group


def _mean_across_ranks(v: torch.Tensor) -> torch.Tensor:
    v = v.detach().clone().float()
    dist.all_reduce(v)
    return v / dist.get_world_size()


def check_batch(batch_size: int, n: int) -> None:
    """Raises ValueError (key and fix) when a batch cannot be drawn from `n` images."""
    if batch_size < 1 or n < batch_size:
        raise ValueError(
            f"trainer.Trainer.batch_size = {batch_size} exceeds the {n} pretraining images (every "
            "step draws a full batch). Fix: lower trainer.Trainer.batch_size, or use more images "
            "(e.g. the dataset's pretrain_size)"
        )


@gin.configurable(module="trainer")
class Trainer:
    """Pretrains a method on a dataset's views.

    Args:
        epochs: passes over the pretraining set (fractions allowed).
        batch_size: images per step (each yields one sample per view).
        optimizer: an optimizer class, e.g. ``@optim.SGD``; called with parameter groups and lr.
        base_lr: learning rate at batch 256; the applied lr is ``base_lr * batch_size / 256``
            (Goyal et al. 2017's linear scaling), or ``base_lr`` when `scale_lr` is False.
        weight_decay: decoupled from biases and norm parameters.
        schedule: ``(step, total) -> multiplier``, e.g. ``@optim.warmup_cosine``.
        max_steps: overrides `epochs` when set (smoke tests).
        checkpoint_every: steps between checkpoints (and one at the end).
        log_every: steps between JSON-lines log records.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        precision: ``fp32``, ``bf16`` (autocast for the networks, the losses in float32:
            `methods.base.fp32`) or ``auto``: bf16 on CUDA, fp32 on CPU.
        channels_last: weights and image batches in channels-last memory format (faster convolutions with
            tensor cores); ``auto``: on CUDA.
        compile: a ``torch.compile`` backend for the method's forward (``inductor``), or None.
        tensorboard: also write the logged curves to ``<folder>/tensorboard`` (`harness.curves`).
        progress: show a progress bar.
        pipeline: how file-backed data is read, decoded and cropped (`harness.data.pipeline`:
            workers, prefetch, decoder); None: ``data.Pipeline()`` with its gin bindings.
    """

    def __init__(
        self,
        epochs: float = 1.0,
        batch_size: int = 256,
        optimizer: Callable = torch.optim.SGD,
        base_lr: float = 0.1,
        scale_lr: bool = True,
        weight_decay: float = 0.0,
        schedule: Callable[[int, int], float] | None = None,
        max_steps: int | None = None,
        checkpoint_every: int = 100,
        log_every: int = 1,
        device: str = "auto",
        precision: str = "auto",
        progress: bool = True,
        pipeline: Pipeline | None = None,
        channels_last: bool | str = "auto",
        compile: str | None = None,
        tensorboard: bool = True,
    ):
        self.epochs, self.batch_size, self.optimizer = epochs, batch_size, optimizer
        self.lr, self.lr_source = scaled_lr(base_lr, batch_size, scale_lr, key="trainer.Trainer.base_lr")
        self.weight_decay, self.max_steps = weight_decay, max_steps
        self.schedule = schedule or (lambda step, total: 1.0)
        self.checkpoint_every, self.log_every, self.progress = checkpoint_every, log_every, progress
        self.device = resolve_device(device)
        self.pipeline = pipeline if pipeline is not None else Pipeline()
        self.channels_last = self.device.type == "cuda" if channels_last == "auto" else bool(channels_last)
        self.compile, self.tensorboard = compile, tensorboard
        self.precision = ("bf16" if self.device.type == "cuda" else "fp32") if precision == "auto" else precision
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.Trainer.precision = {precision!r} is not one of {('auto', *PRECISIONS)}")

    def total_steps(self, method: Method, n: int) -> int:
        if method.pretrain_steps is not None:
            return method.pretrain_steps
        check_batch(self.batch_size, n)
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * n / self.batch_size))

    def fit(
        self, method: Method, data: ImageSet, views: Views, folder: Path, seed: int, stop_after: int | None = None
    ) -> dict:
        """Trains `method` in place, checkpointing to ``folder/checkpoint.pt``; resumes from it.

        Returns:
            ``{"steps": total, "resumed_from": step or None, "final_loss": float}``.
        Raises:
            NonFiniteLoss: with the step number.
            Interrupted: after `stop_after` steps of this call (tests).
        """
        total = self.total_steps(method, len(data))
        if self.batch_size % distributed()[1]:
            raise ValueError(
                f"trainer.Trainer.batch_size = {self.batch_size} must divide evenly among {distributed()[1]} processes"
            )
        trainable = [p for p in method.parameters() if p.requires_grad]
        opt = self.optimizer(param_groups(method, self.weight_decay), lr=self.lr) if trainable else None
        kernel = Kernel(
            opt,
            self.lr,
            lambda step: self.schedule(step, total),
            total,
            self.lr_source,
            "lower trainer.Trainer.base_lr or check the method",
            device=self.device,
            precision=self.precision,
            channels_last=self.channels_last,
            compile=self.compile,
        )
        kernel.prepare(method).train()
        folder.mkdir(parents=True, exist_ok=True)
        ckpt_path, log_path = folder / "checkpoint.pt", folder / "log.jsonl"
        start, resumed = 0, None
        seed_everything(seed)
        self.last_loss = float("nan")
        if ckpt_path.exists():
            ckpt = store.load_torch(ckpt_path, fix=f"delete {ckpt_path} to pretrain this run again from step 0")
            if not isinstance(ckpt, dict) or not {"step", "method", "optimizer", "rng"} <= set(ckpt):
                raise store.StoreError(
                    f"{ckpt_path}: not a checkpoint of this harness (keys: "
                    f"{sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__}). "
                    f"Fix: delete {ckpt_path} to pretrain this run again from step 0"
                )
            self.last_loss = float(ckpt.get("loss", float("nan")))
            method.load_state_dict(ckpt["method"])
            if opt is not None:
                opt.load_state_dict(ckpt["optimizer"])
            set_rng_state(ckpt["rng"])
            start = resumed = int(ckpt["step"])
            print(f"resuming from step {start} of {total} ({ckpt_path})", flush=True)
        _truncate_log(log_path, start)
        bar = tqdm(
            range(start, total),
            initial=start,
            total=total,
            disable=not self.progress or total == 0 or distributed()[0] > 0,
            desc="pretrain",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        global _training, _pending
        _training, self.decoded = True, 0
        try:
            self._loop(method, kernel, data, views, bar, total, start, seed, ckpt_path, log_path, stop_after)
        finally:
            _training, _pending = False, None
        bar.close()
        summary = {"steps": total, "resumed_from": resumed, "final_loss": self.last_loss}
        if file_backed(data):  # this process's decoded images: its shards of the steps it ran
            summary["images_decoded"] = self.decoded
        return summary

    def batches(self, data: ImageSet, views: Views, seed: int, start: int, total: int) -> Generator[Batch, None, None]:
        """This rank's `Batch` of each step from `start`, views drawn. In memory: the global batch's views on every
        rank, then its shard (N ranks follow the one-process trajectory); files: the rank's shard alone, decoded and
        cropped ahead in `pipeline`'s workers, the batched augmentations here (deterministic per world size)."""
        rank, world = distributed()
        if file_backed(data):
            crops = views.crops()
            for item in self.pipeline.batches(
                data, crops, self.batch_size, seed, start, total, self.device, rank, world
            ):
                self.decoded += item["decoded"]
                yield Batch(views=views.from_crops(item["views"]), labels=item["labels"], index=item["index"])
            return
        shard = slice(rank * self.batch_size // world, (rank + 1) * self.batch_size // world)
        for step in range(start, total):
            idx = batch_indices(len(data), self.batch_size, seed, step)
            all_views = views(data.images[idx].to(self.device))
            yield Batch(
                views=[v[shard] for v in all_views],
                labels=data.labels[idx][shard].to(self.device),
                index=idx[shard].to(self.device),
            )

    def _loop(
        self,
        method: Method,
        kernel: Kernel,
        data: ImageSet,
        views: Views,
        bar: tqdm,
        total: int,
        start: int,
        seed: int,
        ckpt_path: Path,
        log_path: Path,
        stop_after: int | None,
    ) -> None:
        global _pending
        rank, world = distributed()
        opt = kernel.optimizer
        model: torch.nn.Module = method
        if world > 1 and not method.data_parallel:
            raise ValueError(
                f"{type(method).__name__}'s loss is not yet the global batch's on {world} processes (its samples "
                "are compared, its randomness drawn or its state updated per rank; methods.base.Method."
                "data_parallel, harness/dist.py). Fix: run it on one process (gin/launch/slurm.gin: "
                "launch.Slurm.tasks_per_node = 1)"
            )
        if world > 1 and method.sync_bn:  # the global batch's statistics (torch's SyncBatchNorm runs on GPUs only)
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
            else:
                model = dist_lib.convert_global_bn(method)
        if world > 1 and opt is not None:  # gradients averaged across ranks
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[torch.cuda.current_device()] if self.device.type == "cuda" else None
            )
        model = kernel.compiled(model)
        batches = self.batches(data, views, seed, start, total)
        curves = Curves(log_path.parent, self.tensorboard and rank == 0, purge_from=start or None)
        with (
            contextlib.closing(batches),
            contextlib.closing(curves),
            open(log_path, "a") if rank == 0 else open(os.devnull, "w") as log,
        ):
            for step, batch in zip(bar, batches):
                batch.views = [kernel.inputs(v) for v in batch.views]
                with kernel.autocast():
                    out = model(batch)
                loss = out["loss"]
                if world > 1:  # the logged and checked loss is the global batch's
                    out = {k: _mean_across_ranks(v) for k, v in out.items()}
                done = step + 1
                logged = step % self.log_every == 0 or done == total
                periodic = done % self.checkpoint_every == 0 or done == total
                stopping = stop_after is not None and done - start >= stop_after
                # The host waits for the device only on steps that log, checkpoint or stop (the loss is checked
                # on the device in between, and any non-finite step named then: Kernel.step).
                synced = logged or periodic or stopping or _pending is not None
                lr = kernel.step(loss, step, check=out["loss"], sync=synced)
                method.after_step(step, total)
                saved = periodic or _pending is not None  # after the step: a signal may have come during it
                if saved and not synced:
                    kernel.check(step)  # no checkpoint of weights a non-finite step has reached
                if synced or saved:
                    self.last_loss = out["loss"].item()
                if logged:
                    rec = {"step": step, "lr": lr, **{k: round(float(v.detach()), 6) for k, v in out.items()}}
                    log.write(json.dumps(rec) + "\n")
                    curves.add(step, {k: v for k, v in rec.items() if k != "step"}, "pretrain")
                    bar.set_postfix(loss=f"{self.last_loss:.4f}", refresh=False)
                if saved and rank == 0:
                    log.flush()
                    self._checkpoint(ckpt_path, done, method, opt, self.last_loss)
                if _pending is not None:  # preempted: checkpoint saved, now requeue and exit
                    print(f"preempted after step {done} of {total}: checkpoint saved, requeueing", flush=True)
                    handler, _pending = _pending, None
                    handler()
                if stop_after is not None and done - start >= stop_after and done < total:
                    raise Interrupted(f"stopped after step {done} of {total}")

    @staticmethod
    def _checkpoint(path: Path, step: int, method: Method, opt: torch.optim.Optimizer | None, loss: float) -> None:
        store.save_torch(
            path,
            {
                "step": step,
                "method": method.state_dict(),
                "loss": loss,
                "optimizer": opt.state_dict() if opt is not None else {},
                "rng": rng_state(),
            },
        )


def _truncate_log(path: Path, start: int) -> None:
    """Drops log records of steps that will be redone after a resume."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < start]
    store.write_text(path, "".join(ln + "\n" for ln in keep))
