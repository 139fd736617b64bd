"""External encoder: evaluate a backbone trained elsewhere, with no pretraining.

Not a method but the seam for one (DESIGN.md: "a pretrained backbone is exported as a
plain timm state dict, loadable by timm alone"): the state dict at `path` (any timm
model's ``state_dict()``, e.g. a timm pretrained checkpoint or another run's
``encoder.pt``) is loaded into the shared timm backbone, ``pretrain_steps = 0`` makes the
trainer run no step (like the random baseline, methods/random.py), and the job exports
it as the run's encoder, so every protocol evaluates it exactly as it evaluates a
pretrained one.

Adjustments made, each only where needed: a wrapping ``{"state_dict": ...}`` or
``{"model": ...}`` is unwrapped and a ``module.`` prefix (DistributedDataParallel)
stripped; the classifier's weights (timm's ``pretrained_cfg["classifier"]``, absent from a
``num_classes=0`` encoder) are dropped; an RGB stem is adapted to grayscale data and back
with timm's ``adapt_input_conv`` (Fashion-MNIST has one channel). Anything else that does
not fit stops the run with the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models import adapt_input_conv
from torch import nn

import gin
from harness import backbone as backbone_lib
from harness import store
from methods.base import Batch, DataInfo, Method


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved state dict: unwrapped from ``state_dict``/``model``, without a ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"external.External.path = '{path}': no such file. Fix: bind it to a saved timm "
            "state dict (torch.save(model.state_dict(), path))"
        )
    state = store.load_torch(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def fit_state_dict(state: dict[str, torch.Tensor], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """`state` adjusted to `model`: classifier dropped, stem adapted to its input channels.

    Raises:
        ValueError: naming the missing, unexpected and mis-shaped keys, and the fix.
    """
    own = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    for head in [classifier] if isinstance(classifier, str) else list(classifier or []):
        state = {k: v for k, v in state.items() if k in own or not k.startswith(head + ".")}
    stem = f"{cfg.get('first_conv')}.weight"
    if (
        stem in state
        and stem in own
        and state[stem].ndim == 4
        and state[stem].shape[1] != own[stem].shape[1]
        and state[stem].shape[0] == own[stem].shape[0]
    ):
        state = {**state, stem: adapt_input_conv(own[stem].shape[1], state[stem])}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        spec = getattr(model, "sslbench_spec", {})
        show = lambda keys: ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")  # noqa: E731
        raise ValueError(
            f"{where}: does not fit the timm model {spec.get('name', type(model).__name__)} "
            f"(in_chans={spec.get('in_chans')}, small_input={spec.get('small_input')}): "
            f"missing {show(missing) or 'none'}; unexpected {show(unexpected) or 'none'}; "
            f"shape mismatches {show(shapes) or 'none'}. Fix: bind `external.External.model` to the timm model the "
            "state dict was saved from (and `backbone.create.small_input` as it was)"
        )
    return state


@gin.configurable(module="external")
class External(Method):
    """A backbone loaded from a state dict; nothing is trained.

    Args:
        backbone: the shared timm encoder (used when `model` is None).
        data: the pretraining data's facts (`DataInfo`): ``channels`` (the input channels of a `model` it builds).
        path: the saved state dict.
        model: the timm model it was saved from, when it is not the scale's backbone
            (``backbone.create.name``); built by ``backbone.create`` with the data's channels.
    """

    pretrain_steps = 0

    def __init__(self, backbone: nn.Module, data: DataInfo, *, path: str | None = None, model: str | None = None):
        if model:
            backbone = backbone_lib.create(name=model, in_chans=data.channels)
        super().__init__(backbone)
        if not path:
            raise ValueError(
                'external.External.path is not bound. Fix: --bind "external.External.path = '
                "'/path/state_dict.pt'\" (a timm model's saved state_dict())"
            )
        self.backbone.load_state_dict(fit_state_dict(read_state_dict(path), self.backbone, path), strict=True)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise RuntimeError("external has nothing to pretrain (pretrain_steps = 0)")
