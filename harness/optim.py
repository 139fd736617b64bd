"""The optimisation kernel of every training loop (pretraining, fine-tuning, the paper probes, detection): batch
order, weight-decay split, linear lr scaling, the one schedule and `Kernel`'s step; and the optimizers and schedules
registered for gin as ``optim.<Name>`` (LARS, You et al. 2017, is written here; SGD, Adam and AdamW are torch's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from typing import Callable, ContextManager, Iterable, Iterator, Mapping, Sequence, cast

import torch
from torch import nn

import gin

for _cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
    gin.external_configurable(_cls, module="optim")

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


PRECISIONS = ("fp32", "bf16")


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the message names the step, the lr and where the lr comes from."""


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of `step`'s batch: epoch-wise permutations, drop-last, a pure function of its arguments.
    The epoch's permutation is drawn once and kept (`_epoch_permutation`): a step costs O(batch), not
    O(n) (ImageNet's 1.28 M: 29 ms per step before, BENCHMARKS.md)."""
    per_epoch = n // batch_size
    epoch, j = divmod(step, per_epoch)
    return _epoch_permutation(n, seed, epoch)[j * batch_size : (j + 1) * batch_size].clone()  # callers own it


@functools.lru_cache(maxsize=4)  # the current epoch's of a few loops (pretraining, a probe); read-only
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def param_groups(model: nn.Module, weight_decay: float, norms_only: bool = False) -> list[dict]:
    """The trainable parameters as decayed, and exempt from decay and LARS (``lars=False``): biases and norm
    parameters (``ndim <= 1``, as SimCLR and BYOL), or with `norms_only` only norm layers' (detectron2's)."""
    norm = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            exempt = id(p) in norm if norms_only else p.ndim <= 1
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0, "lars": False}]


def scaled_lr(base_lr: float, batch_size: int, scale: bool = True, key: str = "lr") -> tuple[float, str]:
    """``base_lr * batch_size / 256`` (Goyal et al. 2017's linear scaling) or `base_lr`, and its source (messages)."""
    if scale:
        return base_lr * batch_size / 256, f"{key} = {base_lr} x batch_size {batch_size} / 256"
    return base_lr, f"{key} = {base_lr}, scale_lr = False"


def lr_factor(
    step: int,
    total: int,
    warmup: float = 0.0,
    decay: str = "cosine",
    final: float = 0.0,
    milestones: Sequence[float] = (),
    warmup_from: float | None = None,
) -> float:
    """Multiplier of the lr at `step` of `total`: a linear warm-up over `warmup` steps (fractions allowed), then
    `decay`: ``cosine`` to `final` after the warm-up (Loshchilov & Hutter 2017), ``step`` (x0.1 at each of
    `milestones`, in steps) or ``constant``. With `warmup_from` None the ramp ``(step + 1) / warmup`` replaces the
    decay (Goyal et al. 2017's gradual warm-up); else ``f (1 - a) + a``, ``a = step / warmup``, rises from ``f``
    and multiplies it (detectron2's WarmupMultiStepLR)."""
    if step < warmup and warmup_from is None:
        return (step + 1) / warmup
    if decay == "cosine":
        t = min(1.0, max(0.0, (step - warmup) / max(1.0, total - warmup)))
        factor = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))
    elif decay == "step":
        factor = 0.1 ** sum(step >= m for m in milestones)
    elif decay == "constant":
        factor = 1.0
    else:
        raise ValueError(f"lr_factor: decay {decay!r} is not one of cosine, step, constant")
    if step < warmup:
        a = step / warmup
        return (cast(float, warmup_from) * (1 - a) + a) * factor  # not None: the ramp returned above
    return factor


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


@contextlib.contextmanager
def _without_onednn() -> Iterator[None]:
    """oneDNN off for the block (its flags' TF32 notice, irrelevant on CPU, silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        flags = torch.backends.mkldnn.flags(enabled=False)
        flags.__enter__()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            flags.__exit__(None, None, None)


@dataclasses.dataclass
class Kernel:
    """One optimisation step of a training loop, and the one place where its numerics are decided:
    `device` (`prepare` places models) and `precision` (``fp32``, or ``bf16``: forward passes under
    bf16 autocast, the losses marked `methods.base.fp32` in float32, weights and optimizer state in
    float32); channels_last and torch.compile belong in `prepare`, so that every loop gets them at
    once. `optimizer` None: only the loss is checked. `lr` (after `scaled_lr`) times
    ``schedule(step)`` is the step's lr; `total`, `source` (of `lr`), `fix` and `name` (a prefix)
    word the `NonFiniteLoss` message."""

    optimizer: torch.optim.Optimizer | None
    lr: float
    schedule: Callable[[int], float]
    total: int
    source: str
    fix: str
    name: str = ""
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    channels_last: bool = False
    compile: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"Kernel: precision {self.precision!r} is not one of {PRECISIONS}")
        self._first_bad: torch.Tensor | None = None  # the first unchecked step whose loss was not finite

    def prepare(self, model: nn.Module) -> nn.Module:
        """`model` on the device, its 4-d weights channels-last when `channels_last` (parameters keep their
        identity: an optimizer on them stays valid)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch in the memory format the prepared model expects (``[B, C, H, W]`` either way)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def compiled(self, model: nn.Module) -> nn.Module:
        """`model` through ``torch.compile`` with backend `compile` (``inductor``: the default; ``eager``
        traces only, for tests), or itself when `compile` is None. Its parameters are `model`'s."""
        return cast(nn.Module, torch.compile(model, backend=self.compile)) if self.compile else model

    def autocast(self) -> ContextManager:
        """The context of forward passes: nothing in fp32; bf16 autocast on the kernel's device in bf16."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
        stack.enter_context(self._cpu_bf16_kernels())
        return stack

    def _cpu_bf16_kernels(self) -> ContextManager:
        """On CPU in bf16, torch's own convolution kernels instead of oneDNN's: oneDNN's bf16 convolution
        backward gives non-finite weight gradients intermittently (a ResNet's 1 x 1 maps, 2 threads: 13
        of 40 steps here, 0 of 40 without it; BENCHMARKS.md), forward and backward alike."""
        if self.precision == "bf16" and self.device.type == "cpu":
            return _without_onednn()
        return contextlib.nullcontext()

    def step(
        self,
        loss: torch.Tensor,
        step: int,
        check: torch.Tensor | None = None,
        terms: Mapping[str, torch.Tensor] | None = None,
        sync: bool = True,
    ) -> float:
        """Checks `check` (default `loss`; e.g. its mean across ranks), raising `NonFiniteLoss` that names the step,
        the lr, its source and the `terms` of the loss; sets the lr on every group (times its ``lr_scale``, when
        it has one), back-propagates, steps. `sync` False: no host synchronisation (a GPU runs ahead); the check
        is kept on the device and made at the next synchronised step, which names the first bad step.
        Returns the lr."""
        lr = self.lr * self.schedule(step)
        checked = (loss if check is None else check).detach()
        bad_here = torch.where(torch.isfinite(checked), torch.inf, float(step))
        self._first_bad = bad_here if self._first_bad is None else torch.minimum(self._first_bad, bad_here)
        if sync:  # the one host synchronisation of a step
            self.check(step, checked, terms)
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)  # a group's own factor: layer-wise lr decay
            self.optimizer.zero_grad(set_to_none=True)
            with self._cpu_bf16_kernels():
                loss.backward()
            self.optimizer.step()
        return lr

    def check(
        self, step: int, checked: torch.Tensor | None = None, terms: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Raises `NonFiniteLoss` naming the first step since the last check whose loss was not finite (`step`'s
        own `checked` value and `terms` when it is that step); waits for the device."""
        first = self._first_bad
        if first is None or not bool(torch.isfinite(first)):
            return
        bad = int(first.item())
        here = bad == step and checked is not None
        parts = "; " + ", ".join(f"{k} {v.item():.4g}" for k, v in terms.items()) if terms and here else ""
        where = f"{self.name}: " if self.name else ""
        value = (
            f"{cast(torch.Tensor, checked).item()}" if here else f"not finite (first at step {bad}; checked at {step})"
        )
        raise NonFiniteLoss(
            f"{where}loss is {value} at step {bad} of {self.total} (lr {self.lr * self.schedule(bad):.4g}, "
            f"from {self.source}, times the schedule{parts}); {self.fix}"
        )


@gin.configurable(module="optim")
class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as used by SimCLR
    and BYOL. Parameter groups with ``lars=False`` (biases, norms) skip the trust ratio.
    """

    def __init__(
        self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001
    ):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"])
                if g["lars"]:
                    pn, dn = p.norm(), d.norm()
                    d = d.mul(torch.where((pn > 0) & (dn > 0), g["eta"] * pn / dn, torch.ones_like(pn)))
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


@gin.configurable(module="optim")
def warmup_cosine(step: int, total: int, warmup: float = 0.0, final: float = 0.0) -> float:
    """The trainer's `lr_factor`: linear warm-up over `warmup` (a fraction of `total` when < 1, else steps), then
    cosine decay to `final` (Loshchilov & Hutter 2017)."""
    return lr_factor(step, total, warmup * total if warmup < 1 else warmup, "cosine", final)


@gin.configurable(module="optim")
def constant(step: int, total: int) -> float:
    """No schedule."""
    return 1.0
