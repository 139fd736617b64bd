"""The Method seam (DESIGN.md): a module that owns its heads and state, and a loss.

The contract: the job builds every method the same way, ``method(backbone, data=DataInfo.of(split))``
(`build_method`), where ``method`` is the gin-configured class. Its constructor is
``__init__(self, backbone, data: DataInfo, *, <settings>)``: the shared timm encoder, the
facts of the pretraining data (one frozen `DataInfo`, whether it reads them or not), and
the paper's settings as keyword arguments, the only parameters gin binds.

A method only says what its loss is and what to update after each step (EMA, queues,
banks). Everything else belongs to the trainer (`harness.trainer`): the device and data
parallelism, the optimizer and its learning-rate schedule (`harness.optim`), checkpoints
and resume, and the precision: float32, or bf16 autocast for the networks (``trainer.Trainer.
precision``) with every loss function marked `fp32` computed in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, Sequence, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import Unsupported

if TYPE_CHECKING:
    from harness.data import ImageSet

__all__ = ["Batch", "DataInfo", "Encoder", "Method", "Unsupported", "build_method", "cross_entropy", "fp32", "mlp"]

LossFn = TypeVar("LossFn", bound=Callable[..., Any])


def fp32(loss: LossFn) -> LossFn:
    """Marks a loss function that runs in float32 under bf16 autocast: its floating-point tensor
    arguments are cast to float32 and autocast is off inside. Every method's loss function carries
    it: they exponentiate or normalise similarities (softmax over thousands of negatives, Sinkhorn,
    NCE), standardise along the batch (Barlow Twins) or sum many squared errors, where bf16's 8 bits
    of mantissa lose the differences the gradient is made of. The networks before it run in bf16."""

    @functools.wraps(loss)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        def up(x: Any) -> Any:  # a tensor, or a list or tuple of them (SwAV's scores per crop)
            if isinstance(x, (list, tuple)):
                return type(x)(up(v) for v in x)
            return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x

        flat = [v for a in (*args, *kwargs.values()) for v in (a if isinstance(a, (list, tuple)) else [a])]
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device_type=device, enabled=False):
            return loss(*map(up, args), **{k: up(v) for k, v in kwargs.items()})

    return cast(LossFn, wrapped)


cross_entropy = fp32(F.cross_entropy)  # for losses that are one cross-entropy (RotNet, Jigsaw, ...)


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a method may know about its pretraining data; the job passes `DataInfo.of` the
    pretraining split to every method's constructor.

    Attributes:
        channels: image channels (1 grayscale, 3 RGB); colour-only methods raise
            `harness.errors.Unsupported` unless 3.
        num_classes: classes of the data (the supervised baseline's classifier width).
        num_images: images in the pretraining split (memory banks, queues, pseudo-labels).
        mean: per-channel mean the views normalise with, in [0, 1] (for methods that need
            pixel values back: colorization, reconstruction).
        std: per-channel std the views normalise with.
        captions: one caption per pretraining image (image-text methods), or None.
    """

    channels: int
    num_classes: int
    num_images: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    captions: tuple[str, ...] | None = None

    @classmethod
    def of(cls, data: ImageSet) -> DataInfo:
        """The facts of a dataset split (an `harness.data.ImageSet`)."""
        return cls(
            channels=data.channels,
            num_classes=len(data.classes),
            num_images=len(data),
            mean=tuple(data.mean),
            std=tuple(data.std),
            captions=None if data.captions is None else tuple(data.captions),
        )


@dataclasses.dataclass
class Batch:
    """What the loader hands a method.

    Attributes:
        views: the views declared in the method's gin file, each float ``[B, C, S, S]``.
        labels: int64 ``[B]`` (only baselines and evaluations may read them).
        index: int64 ``[B]`` positions in the pretraining set (memory banks).
    """

    views: list[torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor


class Encoder(Protocol):
    """What methods read from the timm backbone beyond `nn.Module`, for the type checker only
    (torch types a module's attributes as ``Tensor | Module``): ``cast(Encoder, backbone)``.

    Attributes:
        num_features: width of the pooled output ``backbone(x)``.
    """

    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial map (``[B, C, h, w]`` for a CNN, the tokens for a ViT)."""
        ...


class Method(nn.Module):
    """Base class: one level of inheritance at most.

    Attributes:
        pretrain_steps: steps this method trains for, when it differs from the
            trainer's schedule (``0``: no pretraining at all).
    """

    pretrain_steps: int | None = None
    # Data parallel (harness/dist.py): True once the method's loss on N ranks is the one-process
    # loss of the global batch, with its gradients (tests/test_ddp_losses.py checks every such
    # method); the trainer refuses to run any other on more than one process.
    data_parallel: bool = False
    # BatchNorm over the global batch under data parallel (the papers' SyncBN); False keeps each
    # rank's statistics its own (MoCo's shuffled BN).
    sync_bn: ClassVar[bool] = True

    def __init__(self, backbone: nn.Module):
        """Subclasses take ``(backbone, data: DataInfo, *, <settings>)`` (the module docstring)
        and pass the backbone on here."""
        super().__init__()
        self.backbone = backbone

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"loss": scalar, ...}``; extra entries are logged."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The loss; lets DistributedDataParallel wrap a method and average its gradients."""
        return self.loss(batch)

    def after_step(self, step: int, total: int) -> None:
        """Updates that follow the optimizer step (EMA targets, queues, banks)."""

    def encoder(self) -> nn.Module:
        """The network evaluated after pretraining (the backbone unless stated)."""
        return self.backbone


def build_method(method: Callable[..., Method], backbone: nn.Module, data: DataInfo) -> Method:
    """The one way a method is built: ``method(backbone, data=data)``; gin has bound its settings.

    Used by the job for the run's method and by `methods.multitask` for each of its tasks.

    Raises:
        Unsupported: the method cannot run on this data (its reason).
        TypeError: the constructor does not take ``data`` (it predates this contract).
    """
    try:
        return method(backbone, data=data)
    except TypeError as err:
        if "unexpected keyword argument 'data'" not in str(err):
            raise
        name = getattr(method, "__qualname__", None) or getattr(getattr(method, "func", None), "__qualname__", method)
        raise TypeError(
            f"{name} does not take `data`: every method's constructor is "
            "__init__(self, backbone, data: methods.base.DataInfo, *, <settings>) "
            "(methods/base.py)"
        ) from err


def mlp(dims: Sequence[int], batch_norm: bool = True, last_bn: bool = False) -> nn.Sequential:
    """An MLP head: Linear(-BN)-ReLU blocks, a plain Linear last (SimCLR / MoCo v2 style).

    Args:
        dims: ``[in, hidden, ..., out]``.
        batch_norm: BatchNorm after each hidden Linear.
        last_bn: BatchNorm (no affine) after the last Linear (SimCLR v2, BYOL variants).
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=not (batch_norm and not last)))
        if not last:
            layers += [nn.BatchNorm1d(b)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)
