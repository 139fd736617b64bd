"""Data-parallel training on CPU: 2 gloo processes follow the 1-process loss trajectory."""

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness import ginutil, job
from harness.trainer import Trainer
from tests.conftest import make_images, parse_method

# A LayerNorm network (timm's test ViT): per-sample normalisation, so the comparison
# is exact up to float summation order. BatchNorm networks use SyncBatchNorm on GPUs.
NET = "backbone.create.name = 'test_vit'"
STEPS, BATCH = 6, 16
TOLERANCE = 1e-4  # relative, on each step's loss: different reduction order only


def _train(folder: str) -> None:
    parse_method("supervised", NET)
    data = make_images(64)
    method, views = job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, 0)
    Trainer(
        max_steps=STEPS, batch_size=BATCH, base_lr=0.05, optimizer=torch.optim.SGD, progress=False, checkpoint_every=100
    ).fit(method, data, views, __import__("pathlib").Path(folder), seed=0)


def _rank(rank: int, folder: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        _train(folder)
    finally:
        dist.destroy_process_group()


def _losses(folder) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (folder / "log.jsonl").read_text().splitlines()]


def test_two_gloo_processes_follow_the_one_process_trajectory(tmp_path):
    torch.set_num_threads(1)
    _train(str(tmp_path / "single"))
    port = 29500 + os.getpid() % 1000
    mp.spawn(_rank, args=(str(tmp_path / "ddp"), port), nprocs=2, join=True)
    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == STEPS
    for a, b in zip(single, ddp):
        assert abs(a - b) <= TOLERANCE * abs(a), (single, ddp)
    assert single[-1] < single[0]  # it trained
    w1 = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)["method"]
    w2 = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["method"]
    assert all(torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5) for k in w1)
