"""The one shared network: a timm model without classifier, made in one place.

Every method trains ``timm.create_model(name, num_classes=0, **kwargs)``; its pooled
output is ``model.num_features`` wide and ``forward_features`` gives the spatial map.
Small inputs: ResNets keep their normal stem by default (at 32 px it is 13x faster on
CPU than a CIFAR stem, see BENCHMARKS.md); ``small_input=True`` swaps in a 3x3
stride-1 stem without max-pool, and ViTs take ``img_size``/``patch_size`` kwargs: e.g.
``create("vit_tiny_patch16_224", in_chans=1, img_size=32, patch_size=4)`` is a ViT-Ti with
an 8x8 grid of 4-px patches whose pooled output (the class token) is ``num_features`` wide;
every kwarg (``depth`` too) is kept in the exported ``encoder.json``, so `load` rebuilds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import timm
from torch import nn

import gin
from harness import store


@gin.configurable(module="backbone")
def create(name: str = "resnet18", in_chans: int = 3, small_input: bool = False, **kwargs: Any) -> nn.Module:
    """A randomly initialised timm encoder.

    Args:
        name: a timm model name (``resnet18``, ``vit_tiny_patch16_224``, ...).
        in_chans: input channels (the job passes the dataset's).
        small_input: CIFAR-style stem for ResNets (3x3, stride 1, no max-pool).
        **kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``drop_path_rate``).
    """
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"backbone.create.name = {name!r} is not a timm model; e.g. {', '.join(close)}")
    model = timm.create_model(name, num_classes=0, in_chans=in_chans, pretrained=False, **kwargs)
    if small_input:
        if not hasattr(model, "conv1") or not hasattr(model, "maxpool"):
            raise ValueError(f"backbone.create.small_input is for ResNets; {name} has no conv1/maxpool stem")
        if isinstance(model.conv1, nn.Conv2d):
            model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, 1, 1, bias=False)
        else:  # a deep stem (resnet*d, *t): keep it, without its stride
            next(m for m in cast(nn.Module, model.conv1).modules() if isinstance(m, nn.Conv2d)).stride = (1, 1)
        model.maxpool = nn.Identity()
    # a plain attribute (torch types module attributes as tensors or modules); `export` writes it
    model.sslbench_spec = {"name": name, "in_chans": in_chans, "small_input": small_input, **kwargs}  # type: ignore[assignment]
    return model


def fit_input_size(model: nn.Module, size: int) -> nn.Module:
    """`model`, made to read ``size``-px images: a timm ViT built for another size gets its
    position embeddings resampled (timm's ``set_input_size``; bicubic, as when ViTs are
    fine-tuned at a higher resolution, Dosovitskiy et al. 2021); CNNs read any size as they are."""
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    if img_size is not None and tuple(img_size) != (size, size) and hasattr(model, "set_input_size"):
        cast(Any, model).set_input_size(img_size=size)  # a timm ViT's (checked above)
    return model


def export(model: nn.Module, folder: Path) -> None:
    """Writes ``encoder.pt`` (a plain timm state dict) and ``encoder.json`` (how to rebuild it)."""
    store.save_torch(folder / "encoder.pt", {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    store.write_json(folder / "encoder.json", model.sslbench_spec)


def load(folder: Path) -> nn.Module:
    """Rebuilds an exported encoder: ``timm.create_model(name, num_classes=0, ...)`` + strict load."""
    spec = json.loads((folder / "encoder.json").read_text())
    model = create(**spec)
    model.load_state_dict(store.load_torch(folder / "encoder.pt"), strict=True)
    return model.eval()
