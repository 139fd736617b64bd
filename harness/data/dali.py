"""The NVIDIA DALI decoder (``data.Pipeline.decoder = 'dali'``): JPEGs decoded on the GPU (nvJPEG, DALI's
``mixed`` backend), each view cut, resized and flipped there.

The batch order, shards and crop boxes are `harness.data.pipeline`'s (each box drawn in full-resolution
coordinates from the sample's own generator, the image size read from its header), so a run keeps the
determinism of the CPU decoders per (seed, world size); only the decoder and the resampling differ. It needs
CUDA and the ``dali`` extra (``pip install --extra-index-url https://pypi.nvidia.com nvidia-dali-cuda120``,
or the wheel matching the CUDA version); `check` says which is missing. Without a GPU this file cannot run:
no test here exercises `batches`, and BENCHMARKS.md has no DALI figure until a session is lent a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from harness.data.base import DataError

if TYPE_CHECKING:
    from harness.data.pipeline import FileBatches

INSTALL = "pip install --extra-index-url https://pypi.nvidia.com nvidia-dali-cuda120 (the wheel of your CUDA version)"


def check() -> None:
    """Raises `DataError` naming the key and the fix when CUDA or DALI is missing."""
    if not torch.cuda.is_available():
        raise DataError(
            "`data.Pipeline.decoder = 'dali'` decodes on a GPU, and this machine has no CUDA device. Fix: bind "
            "data.Pipeline.decoder = 'torchvision' (or 'pil'), or run on a GPU node"
        )
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        raise DataError(
            f"`data.Pipeline.decoder = 'dali'` needs NVIDIA DALI, which is not installed ({err}). Fix: {INSTALL}, "
            "or bind data.Pipeline.decoder = 'torchvision'"
        ) from err


def _step_inputs(items: Any, step: int) -> tuple[list[np.ndarray], list[list[np.ndarray]], list[np.ndarray], Any]:
    """For one step of a `FileBatches`: the encoded files, per view the boxes as ``(x, y, w, h)`` float32 and
    the flips, and the shard's indices."""
    from harness.data.pipeline import _pil_size, crop_box, sample_rng
    from harness.optim import batch_indices

    idx = batch_indices(len(items.paths), items.batch_size, items.seed, step)
    shard = items.shard()
    files: list[np.ndarray] = []
    boxes: list[list[np.ndarray]] = [[] for _ in items.crops]
    flips: list[list[np.ndarray]] = [[] for _ in items.crops]
    for pos, i in zip(range(shard.start, shard.stop), idx[shard].tolist()):
        path = items.paths[i]
        height, width = _pil_size(path)
        rng = sample_rng(items.seed, step, pos)
        drawn = [crop_box(rng, height, width, c) for c in items.crops]
        for v, c in enumerate(items.crops):
            top, left, h, w = drawn[v]
            boxes[v].append(np.array([left, top, w, h], dtype=np.float32))
        for v, c in enumerate(items.crops):
            flips[v].append(np.array(rng.random() < c.flip, dtype=np.int32))
        with open(path, "rb") as f:
            files.append(np.frombuffer(f.read(), dtype=np.uint8))
    return files, boxes, [np.stack(f) for f in flips], idx[shard]


def batches(items: FileBatches, start: int, total: int, device: torch.device, threads: int) -> Iterator[dict]:
    """`Pipeline.batches` on DALI: the items of `items` (its shards, boxes and flips) for steps ``start ..
    total - 1``, decoded and cropped on the GPU with `threads` CPU threads for reading."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import feed_ndarray

    crops, channels, labels = items.crops, items.channels, items.labels
    per_rank = items.batch_size // items.world
    steps = iter(range(start, total))

    def source() -> tuple:  # DALI calls it ahead of the step being trained (its prefetch queue)
        step = next(steps)  # StopIteration ends the pipeline
        encoded, boxes, flips, index = _step_inputs(items, step)
        out: list = [encoded, [np.array(i, dtype=np.int64) for i in index.tolist()]]
        for v in range(len(crops)):
            out += [[b[:2] for b in boxes[v]], [b[2:] for b in boxes[v]], list(flips[v])]
        return tuple(out)

    @pipeline_def(batch_size=per_rank, num_threads=threads, device_id=torch.cuda.current_device())
    def graph() -> tuple:
        outs = fn.external_source(source=source, num_outputs=2 + 3 * len(crops), batch=True, cycle=False)
        image = fn.decoders.image(outs[0], device="mixed", output_type=types.RGB if channels == 3 else types.GRAY)
        views = []
        for v, c in enumerate(crops):
            anchor, shape, flip = outs[2 + 3 * v], outs[3 + 3 * v], outs[4 + 3 * v]
            cut = fn.slice(image, anchor, shape, axis_names="WH")
            cut = fn.resize(cut, resize_x=c.size, resize_y=c.size, antialias=True)
            views.append(fn.transpose(fn.flip(cut, horizontal=flip), perm=[2, 0, 1]))  # HWC -> CHW
        return (outs[1], *views)

    pipe = graph()
    pipe.build()
    for _ in range(start, total):
        index_out, *outputs = pipe.run()
        index = torch.from_numpy(np.array(index_out.as_tensor())).view(-1)  # [b], the step's own
        views = []
        for out in outputs:
            dense = out.as_tensor()
            view = torch.empty(dense.shape(), dtype=torch.uint8, device=device)
            feed_ndarray(dense, view, cuda_stream=torch.cuda.current_stream())
            views.append(view)  # [b, C, S, S]
        yield {
            "index": index.to(device),
            "labels": labels[index].to(device),
            "views": views,
            "decoded": len(index),
        }
