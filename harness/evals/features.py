"""Frozen-feature extraction, once per (encoder, dataset split), cached on disk.

Every frozen-feature protocol (kNN, linear probe, ...) reads the same cached
features: ``<pretrain folder>/features/<key>.pt``, the key hashing the split, the
subset and the preprocessing. Each file has a checksum sidecar (``<key>.pt.json``) and is
extracted again when it does not match it (`harness.store.load_cache`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import gin
from harness import ginutil, store
from harness.data import ImageSet
from harness.evals import Features
from harness.views import eval_view


@torch.no_grad()
def extract(
    encoder: nn.Module,
    data: ImageSet,
    image_size: int,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    desc: str = "features",
    progress: bool = True,
    precision: str = "fp32",
) -> Features:
    """Pooled features of every image, in eval mode (under bf16 autocast with `precision` ``bf16``; the
    features are stored in float32). Returns x ``[N, D]``, y ``[N]``."""
    encoder = encoder.to(device).eval()
    dev = torch.device(device)
    chunks = []
    for i in tqdm(
        range(0, len(data), batch_size), desc=desc, disable=not progress, dynamic_ncols=True, mininterval=1.0
    ):
        x = eval_view(data.images[i : i + batch_size].to(dev), image_size, data.mean, data.std)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            chunks.append(encoder(x).flatten(1).float().cpu())  # [b, D]
    return Features(x=torch.cat(chunks), y=data.labels.clone())


@gin.configurable(module="features")
class FrozenFeatures:
    """Which images the frozen-feature protocols see, and how they are preprocessed.

    Args:
        image_size: side of the centre view (the pretraining view size).
        train_size: labelled training images for the protocols (a fixed subset; None: all).
        test_size: test images (a fixed subset; None: all).
        batch_size: extraction batch size.
        precision: ``fp32``, ``bf16`` (autocast) or ``auto``: bf16 on CUDA, fp32 on CPU. bf16 features are
            cached under their own key.
    """

    def __init__(
        self,
        image_size: int = gin.REQUIRED,
        train_size: int | None = None,
        test_size: int | None = None,
        batch_size: int = 512,
        precision: str = "auto",
    ):
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"features.FrozenFeatures.precision = {precision!r} is not one of auto, fp32, bf16")
        self.image_size, self.batch_size, self.precision = image_size, batch_size, precision
        self.sizes = {"train": train_size, "test": test_size}

    def resolved_precision(self, device: torch.device | str) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if torch.device(device).type == "cuda" else "fp32"

    def key(self, dataset_name: str, split: str, precision: str = "fp32") -> str:
        parts: list = [dataset_name, split, self.sizes[split], self.image_size]
        return ginutil.digest([json.dumps(parts if precision == "fp32" else [*parts, precision])])

    def __call__(
        self, encoder: nn.Module, dataset, cache: Path, device: torch.device | str = "cpu", progress: bool = True
    ) -> dict[str, Features]:
        """``{"train": Features, "test": Features}``, read from `cache` when a file there matches
        its checksum sidecar (else extracted again). ``self.used`` then maps each cache file
        read or written to its `store.file_meta`: the run records them as what its numbers depend on."""
        out, self.used = {}, {}
        precision = self.resolved_precision(device)
        for split in ("train", "test"):
            path = cache / f"{self.key(dataset.name, split, precision)}.pt"
            hit = store.load_cache(path)
            if hit is not None and isinstance(hit[0], dict) and {"x", "y"} <= set(hit[0]):
                (d, self.used[path]) = hit
                out[split] = Features(d["x"], d["y"])
                continue
            data = dataset.split(split).subset(self.sizes[split])
            out[split] = extract(
                encoder, data, self.image_size, self.batch_size, device, f"features/{split}", progress, precision
            )
            self.used[path] = store.save_cache(path, {"x": out[split].x, "y": out[split].y})
        return out
