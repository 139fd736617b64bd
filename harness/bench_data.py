"""Input-pipeline benchmarks (`python -m harness.bench decode|pipeline|shards`), on a generated
ImageNet-format tree of 500 x 375 JPEGs (`harness.data.pipeline.generate_jpeg_tree`).

- ``decode``: images/s on one core of each decode path: the old one (PIL, shorter side to 256, centre
  crop: what `ImageFiles` still gives evaluations), torchvision's full decode, and each decoder's
  RandomResizedCrop from the full image (at 224 and 64 px).
- ``pipeline``: a ResNet-18 training step (one view, batch 64, one thread) fed by `data.Pipeline`
  with one worker process on the other core, against the same step on an in-memory batch of the same
  shape (synthetic); and serially (workers = 0), which shows what the overlap hides. Where decoding a
  batch costs at least half a step serially, the fed/synthetic ratio should stay >= 0.9.
- ``shards``: images each of 2 gloo ranks decodes per step (its shard: half the batch).
- ``finetune``: the evaluations' fine-tuning step (`harness.evals.finetune.train`, a ResNet-18 on
  64-px crops of the 256-px copies, batch 64, one torch thread) on an image folder whose next batch is
  decoded on a background thread (one decode thread), against the same batches decoded in line and
  against the images held in memory.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CLASSES = ["n01440764", "n01443537", "n01484850", "n01491361"]


def _tree(root: Path, per_class: int) -> list[str]:
    from harness.data.pipeline import generate_jpeg_tree

    return [str(p) for p in generate_jpeg_tree(root, CLASSES, per_class, size=(500, 375), splits=("train",))]


def decode(images: int = 96) -> list[dict]:
    """Images/s per core of each decode path (one thread, one process)."""
    from harness.data import files
    from harness.data.pipeline import Crop, crops_of, decode_full, sample_rng

    torch.set_num_threads(1)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = _tree(Path(tmp), images // len(CLASSES))
        paths_cycle = paths * 2

        def rate(fn) -> float:
            for p in paths[:4]:  # warm-up: imports, page cache
                fn(p, 0)
            t = time.perf_counter()
            for i, p in enumerate(paths_cycle):
                fn(p, i)
            return len(paths_cycle) / (time.perf_counter() - t)

        old = rate(lambda p, i: files.decode(p, 256))
        rows.append({"path": "PIL, shorter side 256 + centre crop (old; evaluations)", "img_s": round(old, 1)})
        full = rate(lambda p, i: decode_full(p, 3))
        rows.append({"path": "torchvision decode_image, full image", "img_s": round(full, 1)})
        for size in (224, 64):
            crop = Crop(size, (0.08, 1.0), (3 / 4, 4 / 3), 0.5)
            for decoder in ("torchvision", "pil"):
                r = rate(lambda p, i, d=decoder, c=crop: crops_of(p, 3, [c], sample_rng(0, 0, i), d))
                what = "torchvision full decode" if decoder == "torchvision" else "PIL with DCT-scaled decode"
                rows.append({"path": f"{what} + RandomResizedCrop to {size}", "img_s": round(r, 1)})
    for row in rows:
        row["vs_old"] = round(float(row["img_s"]) / old, 2)
        print(row, flush=True)
    return rows


def pipeline(
    backbone_name: str = "resnet18",
    size: int | str = 64,
    batch: int | str = 64,
    steps: int | str = 24,
    decoder: str = "torchvision",
) -> list[dict]:
    """Steps/s of a training step (`backbone_name` on `size`-px crops, one view, one thread) fed by the file
    pipeline (1 worker; 0 = serial) vs an in-memory batch. CLI: ``pipeline [BACKBONE [SIZE [BATCH [STEPS]]]]``."""
    size, batch, steps = int(size), int(batch), int(steps)
    from harness import backbone
    from harness.data import ImageSet
    from harness.data.pipeline import Pipeline
    from harness.views import Augment

    torch.set_num_threads(1)
    augment = Augment(size=size)  # SimCLR's: jitter, grayscale after the crop
    crop = augment.crop()
    net = backbone.create(backbone_name, in_chans=3)
    head = torch.nn.Linear(net.num_features, len(CLASSES))
    opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.01, momentum=0.9)

    def train(views: torch.Tensor, labels: torch.Tensor) -> None:
        x = augment.after_crop(views.float().div_(255))
        loss = torch.nn.functional.cross_entropy(head(net(x)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    rows: list[dict] = [{"backbone": backbone_name, "crop": size, "batch": batch, "steps": steps}]
    with tempfile.TemporaryDirectory() as tmp:
        from harness.data.files import ImageFiles

        paths = _tree(Path(tmp), batch * 2 // len(CLASSES))
        labels = torch.arange(len(paths)) % len(CLASSES)
        data = ImageSet(ImageFiles(paths, 256), labels, CLASSES, (0.5,) * 3, (0.5,) * 3)
        synthetic = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        fixed_labels = labels[:batch]
        train(synthetic, fixed_labels)  # warm-up
        t = time.perf_counter()
        for _ in range(steps):
            train(synthetic, fixed_labels)
        synth = steps / (time.perf_counter() - t)
        rows.append({"feed": "synthetic in-memory batch", "steps_s": round(synth, 3)})
        loader = Pipeline(workers=0, decoder=decoder)
        t = time.perf_counter()
        for item in loader.batches(data, [crop], batch, 0, 0, steps, torch.device("cpu")):
            pass
        decode_s = (time.perf_counter() - t) / steps
        for workers in (0, 1):
            feed = Pipeline(workers=workers, prefetch=4, decoder=decoder)
            it = feed.batches(data, [crop], batch, 0, 0, steps + 2, torch.device("cpu"))
            item = next(it)  # worker start-up and the first batch: not part of the steady rate
            train(item["views"][0], item["labels"])
            item = next(it)
            train(item["views"][0], item["labels"])
            t = time.perf_counter()
            for item in it:
                train(item["views"][0], item["labels"])
            rate = steps / (time.perf_counter() - t)
            rows.append(
                {
                    "feed": f"data.Pipeline, {decoder}, {workers} worker(s)" + (" (serial)" if not workers else ""),
                    "steps_s": round(rate, 3),
                    "vs_synthetic": round(rate / synth, 3),
                }
            )
    rows.append(_decode_vs_step("serial decode of a batch / a synthetic step", decode_s, synth))
    for r in rows:
        print(r, flush=True)
    return rows


def _decode_vs_step(what: str, decode_s: float, steps_s: float) -> dict:
    """The row comparing a batch's decoding with a step: seconds of each and their ratio."""
    return {
        "feed": what,
        "decode_s_per_batch": round(decode_s, 3),
        "step_s": round(1 / steps_s, 3),
        "ratio": round(decode_s * steps_s, 2),
    }


def _shard_rank(rank: int, root: str, out: str, port: int, batch: int, steps: int) -> None:
    import torch.distributed as dist

    from harness.data import ImageFolder
    from harness.data.pipeline import Crop, Pipeline

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        data = ImageFolder(root=root).split("train")
        crop = Crop(64, (0.08, 1.0), (3 / 4, 4 / 3), 0.5)
        decoded = [
            item["decoded"]
            for item in Pipeline(workers=0).batches(data, [crop], batch, 0, 0, steps, torch.device("cpu"), rank, 2)
        ]
        Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "decoded_per_step": decoded}))
    finally:
        dist.destroy_process_group()


def shards(batch: int = 32, steps: int = 4) -> list[dict]:
    """Images decoded per step by each of 2 gloo ranks."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        _tree(Path(tmp) / "tree", batch // len(CLASSES) * 2)
        mp.spawn(_shard_rank, args=(str(Path(tmp) / "tree"), tmp, 29700 + os.getpid() % 200, batch, steps), nprocs=2)
        rows = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in rows:
        r.update(global_batch=batch, mean_decoded=float(np.mean(r["decoded_per_step"])))
        print(r, flush=True)
    return rows


def finetune(
    backbone_name: str = "resnet18", size: int | str = 64, batch: int | str = 64, steps: int | str = 24
) -> list[dict]:
    """Steps/s of `harness.evals.finetune.train` on files, decoding ahead or in line, vs in memory.
    CLI: ``finetune [BACKBONE [SIZE [BATCH [STEPS]]]]``."""
    import dataclasses

    from harness import backbone
    from harness.data import ImageSet
    from harness.data.files import ImageFiles
    from harness.evals import finetune as ft

    size, batch, steps = int(size), int(batch), int(steps)
    torch.set_num_threads(1)
    rows: list[dict] = [{"backbone": backbone_name, "crop": size, "batch": batch, "steps": steps}]
    with tempfile.TemporaryDirectory() as tmp:
        paths = _tree(Path(tmp), batch * 4 // len(CLASSES))  # 4 steps an epoch
        labels = torch.arange(len(paths)) % len(CLASSES)
        files = ImageSet(ImageFiles(paths, 256, threads=1), labels, CLASSES, (0.5,) * 3, (0.5,) * 3)
        memory = dataclasses.replace(files, images=files.images[:])
        recipe = ft.Recipe(epochs=steps / 4, batch_size=batch, lr=0.01)
        t = time.perf_counter()
        for i in range(4):
            files.images[torch.arange(i * batch, (i + 1) * batch)]
        decode_s = (time.perf_counter() - t) / 4

        def rate(data: ImageSet) -> float:
            torch.manual_seed(0)
            net = backbone.create(backbone_name, in_chans=3)
            head = torch.nn.Linear(net.num_features, len(CLASSES))
            t = time.perf_counter()
            ft.train(net, head, data, torch.arange(len(data)), recipe, size, fine_tune=True, seed=0)
            return steps / (time.perf_counter() - t)

        ahead = ft.decoded

        def in_line(images, indices, pin=False):
            for idx in indices:
                yield idx, images[idx]

        rate(memory)  # warm-up
        base = rate(memory)
        rows.append({"feed": "images in memory", "steps_s": round(base, 3)})
        rows.append(
            {
                "feed": "files, next batch decoded ahead",
                "steps_s": round(r := rate(files), 3),
                "vs_memory": round(r / base, 3),
            }
        )
        try:
            ft.decoded = in_line  # type: ignore[assignment]
            r = rate(files)
        finally:
            ft.decoded = ahead
        rows.append({"feed": "files, decoded in line", "steps_s": round(r, 3), "vs_memory": round(r / base, 3)})
        rows.append(_decode_vs_step("decode of a batch / a step in memory", decode_s, base))
    for row in rows:
        print(row, flush=True)
    return rows
