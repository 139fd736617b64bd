"""The file pipeline (harness/data/pipeline.py) on a generated ImageNet-format JPEG tree: crops from the full
image, shards per rank, workers, resume, two gloo ranks, corrupt files and the DALI switch."""

import dataclasses
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness import ginutil, job
from harness.data import DataError, ImageFiles, ImageFolder
from harness.data.pipeline import Crop, FileBatches, Pipeline, crop_box, generate_jpeg_tree
from harness.trainer import Trainer
from tests.conftest import assert_resumes_exactly, parse_method

CROPS = [Crop(24, (0.08, 1.0), (3 / 4, 4 / 3), 0.5), Crop(12, (0.05, 0.3), (3 / 4, 4 / 3), 0.5)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    generate_jpeg_tree(root, ["n01", "n02"], per_class=12, size=(100, 75), splits=("train", "val"))
    return root


def _train_split(tree: Path):
    return ImageFolder(root=str(tree)).split("train")


def test_crop_boxes_follow_random_resized_crop():
    rng = np.random.default_rng(0)
    crop = Crop(32, (0.08, 1.0), (3 / 4, 4 / 3), 0.5)
    boxes = [crop_box(rng, 375, 500, crop) for _ in range(2000)]
    areas = np.array([h * w / (375 * 500) for _, _, h, w in boxes])
    ratios = np.array([w / h for _, _, h, w in boxes])
    assert all(0 <= t and 0 <= lf and t + h <= 375 and lf + w <= 500 for t, lf, h, w in boxes)
    assert areas.min() >= 0.075 and areas.max() <= 1.0 and 0.35 < np.median(areas) < 0.65
    assert ratios.min() >= 0.74 and ratios.max() <= 1.34
    # an image far wider than any allowed ratio: no try fits, the fallback is the centred crop at the widest ratio
    t, lf, h, w = crop_box(np.random.default_rng(0), 10, 1000, Crop(8, (0.9, 1.0), (3 / 4, 4 / 3), 0.0))
    assert (h, w) == (10, 13) and lf == (1000 - 13) // 2 and t == 0


def test_each_rank_decodes_its_shard_and_the_crops_do_not_depend_on_it(tree):
    train = _train_split(tree)
    paths = train.images.paths
    whole = FileBatches(paths, train.labels, 3, CROPS, 8, seed=1)[5]
    shards = [FileBatches(paths, train.labels, 3, CROPS, 8, seed=1, rank=r, world=2)[5] for r in (0, 1)]
    assert [s["decoded"] for s in shards] == [4, 4] and whole["decoded"] == 8
    assert torch.equal(torch.cat([s["index"] for s in shards]), whole["index"])
    for v, view in enumerate(whole["views"]):
        assert view.shape == (8, 3, CROPS[v].size, CROPS[v].size) and view.dtype == torch.uint8
        assert torch.equal(torch.cat([s["views"][v] for s in shards]), view)
    assert not torch.equal(FileBatches(paths, train.labels, 3, CROPS, 8, seed=1)[6]["views"][0], whole["views"][0])


def test_the_crop_comes_from_the_full_image_not_a_resized_copy(tmp_path):
    # A 400 x 100 image, left half black and right half white: a centre-cropped 100-px copy (the old path) holds
    # only its middle; crops from the full image see both halves' pure colours at its far ends.
    from PIL import Image

    arr = np.zeros((100, 400, 3), np.uint8)
    arr[:, 200:] = 255
    (tmp_path / "train" / "c").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "train" / "c" / "x.png")
    crop = Crop(8, (0.2, 0.25), (1.0, 1.0), 0.0)
    items = FileBatches([str(tmp_path / "train" / "c" / "x.png")], torch.zeros(1, dtype=torch.long), 3, [crop], 1, 0)
    means = [items[s]["views"][0].float().mean().item() for s in range(60)]
    assert min(means) < 5 and max(means) > 250


def test_pil_and_torchvision_decoders_cut_the_same_boxes(tree):
    train = _train_split(tree)
    a = FileBatches(train.images.paths, train.labels, 3, CROPS, 8, 0, decoder="torchvision")[2]["views"]
    b = FileBatches(train.images.paths, train.labels, 3, CROPS, 8, 0, decoder="pil")[2]["views"]
    for x, y in zip(a, b):  # decoders and DCT scaling differ by a few grey levels, not by the box
        assert (x.float() - y.float()).abs().mean() < 8


def _build(train):
    return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), train, 0)


def test_worker_resume_is_exact(tree, tmp_path):
    parse_method("simclr", "IMAGE_SIZE = 24")
    train = _train_split(tree)
    kwargs = {"batch_size": 8, "pipeline": Pipeline(workers=1, prefetch=2)}
    assert_resumes_exactly(lambda: _build(train), train, tmp_path, steps=5, stop_after=3, trainer_kwargs=kwargs)


def test_worker_count_does_not_change_the_run(tree, tmp_path):
    parse_method("simclr", "IMAGE_SIZE = 24")
    train = _train_split(tree)
    out = []
    for workers in (0, 2):
        method, views = _build(train)
        trainer = Trainer(max_steps=3, batch_size=8, progress=False, pipeline=Pipeline(workers=workers))
        info = trainer.fit(method, train, views, tmp_path / str(workers), seed=0)
        out.append((method.state_dict(), info))
    assert out[0][1]["images_decoded"] == out[1][1]["images_decoded"] == 3 * 8
    assert all(torch.equal(out[0][0][k], out[1][0][k]) for k in out[0][0])


def test_a_corrupt_file_stops_the_run_with_its_path(tree, tmp_path):
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    bad = root / "train" / "n01" / "n01_0.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    parse_method("simclr", "IMAGE_SIZE = 24")
    train = _train_split(root)
    method, views = _build(train)
    trainer = Trainer(max_steps=3, batch_size=24, progress=False, pipeline=Pipeline(workers=1))
    with pytest.raises(DataError, match="n01_0.JPEG: cannot decode image") as err:
        trainer.fit(method, train, views, tmp_path / "run", seed=0)
    assert str(err.value).startswith(str(bad)) and "Traceback" not in str(err.value)


def test_dali_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may run DALI")
    with pytest.raises(DataError, match="data.Pipeline.decoder = 'dali'.*Fix: bind data.Pipeline.decoder"):
        Pipeline(decoder="dali").check()
    with pytest.raises(DataError, match="not one of"):
        Pipeline(decoder="nvjpeg").check()


def _rank(rank: int, tree: str, folder: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        parse_method("simclr", "IMAGE_SIZE = 24")
        train = _train_split(Path(tree))
        method, views = _build(train)
        info = Trainer(max_steps=4, batch_size=8, progress=False, pipeline=Pipeline(workers=1)).fit(
            method, train, views, Path(folder), seed=0
        )
        Path(folder, f"rank{rank}.json").write_text(json.dumps(info))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_decode_their_shards_and_repeat_their_trajectory(tree, tmp_path):
    port = 29500 + (os.getpid() + 7) % 1000
    for run in ("a", "b"):
        mp.spawn(_rank, args=(str(tree), str(tmp_path / run), port + (run == "b")), nprocs=2, join=True)
    for run in ("a", "b"):
        infos = [json.loads((tmp_path / run / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [i["images_decoded"] for i in infos] == [4 * 4, 4 * 4]  # 4 steps x its half of 8
    logs = [(tmp_path / run / "log.jsonl").read_text() for run in ("a", "b")]
    assert logs[0] == logs[1] and len(logs[0].splitlines()) == 4


def test_the_sweep_refuses_dali_without_cuda_before_writing_anything(tree, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may run DALI")
    results = tmp_path / "results"
    binds = [
        "table.Table.seeds = [0]",
        "job.run.dataset = @data.ImageFolder()",
        f"data.ImageFolder.root = '{tree}'",
        "data.Pipeline.decoder = 'dali'",
    ]
    cmd = [sys.executable, "-m", "harness.sweep", "gin/table1.gin", "gin/scale/smoke.gin", "--only", "simclr"]
    cmd += [a for b in binds for a in ("--bind", b)] + ["--results", str(results)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "data.Pipeline.decoder = 'dali'" in proc.stderr and "Fix: bind data.Pipeline.decoder" in proc.stderr
    assert not results.exists()


def test_slurm_runs_one_ddp_rank_per_gpu_unless_told_otherwise():
    from harness import ginutil
    from harness.launch import Slurm

    params = Slurm(gpus_per_node=8, nodes=2).params
    assert (params["tasks_per_node"], params["nodes"]) == (8, 2)
    assert Slurm(gpus_per_node=0).params["tasks_per_node"] == 1  # CPU jobs: one process
    assert Slurm(gpus_per_node=8, tasks_per_node=1).params["tasks_per_node"] == 1
    ginutil.parse(["gin/launch/slurm.gin"], ["launch.Slurm.gpus_per_node = 4"])
    import gin

    assert gin.query_parameter("launch.Slurm.tasks_per_node") is None
    assert Slurm().params["tasks_per_node"] == 4


class _RecordingFiles(ImageFiles):
    """Image files that note which thread asked for each batch."""

    def __init__(self, files: ImageFiles, threads: list[str]):
        super().__init__(files.paths, files.size, files.channels, files.threads)
        self.asked_from = threads

    def __getitem__(self, idx):
        self.asked_from.append(threading.current_thread().name)
        return super().__getitem__(idx)


def _fine_tune(data, steps_seed: int = 0):
    from harness.evals import finetune

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
    )
    head = torch.nn.Linear(4, 2)
    recipe = finetune.Recipe(epochs=3, batch_size=8, lr=0.1)  # 3 steps an epoch of the 24 images: 9 steps
    done = finetune.train(encoder, head, data, torch.arange(len(data)), recipe, 24, fine_tune=True, seed=steps_seed)
    finetune.refresh_bn(encoder, head, data, torch.arange(len(data)), 24, 0.875, fine_tune=True)
    return (
        done,
        finetune.test(encoder, head, data, 24, 0.875, batch_size=10),
        [*encoder.state_dict().values(), *head.state_dict().values()],
    )


def test_fine_tuning_on_files_decodes_ahead_and_gives_the_in_memory_numbers(tree):
    """The evaluations' fine-tuning (semi-supervised, the paper probes) decodes an image folder's
    next batch on a background thread while the step before trains; the numbers are those of
    the same images held in memory."""
    files = _train_split(tree)
    asked: list[str] = []
    recorded = dataclasses.replace(files, images=_RecordingFiles(files.images, asked))
    memory = dataclasses.replace(files, images=files.images[:])  # every image decoded up front
    (ran_f, test_f, weights_f), (ran_m, test_m, weights_m) = _fine_tune(recorded), _fine_tune(memory)
    assert ran_f == ran_m and test_f == test_m and ran_f["steps"] == 9
    assert all(torch.equal(a, b) for a, b in zip(weights_f, weights_m))
    assert len(asked) == 9 + 1 + 3 and set(asked) == {"decode-ahead_0"}  # train, Precise BN, test batches
    assert not torch.equal(weights_m[0], _fine_tune(memory, steps_seed=1)[2][0])  # the seed matters


def test_a_corrupt_file_stops_fine_tuning_with_its_path(tree, tmp_path):
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    (root / "train" / "n02" / "n02_3.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="n02_3.JPEG: cannot decode image"):
        _fine_tune(_train_split(root))
