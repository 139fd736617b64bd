"""Protocol budgets: the steps a recipe plans are the steps it runs, Precise BN sets exact
statistics, the dry run and the leaderboard print what the settings cost, and (slow) the
embedded recipes of Goyal's probe and SimCLR's fine-tuning give measurements on a real
Fashion-MNIST encoder, not artefacts of too few steps (issue 13)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import backbone as backbone_lib
from harness import ginutil, sweep
from harness.collate import collate
from harness.data import FashionMNIST
from harness.evals import Context, Features, finetune
from harness.evals.linear import LinearProbe, PaperProbe
from harness.evals.semisup import SemiSupervised
from tests.conftest import REPO, fmnist_available, make_images


class Pool(nn.Module):
    """A frozen 'encoder': each image's mean and max per channel (2 features per channel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)  # [B, 2C]


@pytest.mark.parametrize("augment", ["crop", "none"])
@pytest.mark.parametrize("n,batch,epochs", [(50, 8, 3), (50, 64, 2.5), (37, 10, 0.5)])
def test_budget_is_the_number_of_steps_training_takes(n, batch, epochs, augment):
    data = make_images(n, classes=4)
    head = nn.Linear(2, 4)
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    recipe = finetune.Recipe(epochs=epochs, batch_size=batch, lr=0.1, augment=augment)
    done = finetune.train(Pool(), head, data, torch.arange(n), recipe, 16, fine_tune=False, seed=0)
    per_epoch = n // min(batch, n)
    assert len(calls) == done["steps"] == recipe.budget(n)["steps"] == max(1, math.ceil(epochs * per_epoch))
    assert done["images_seen"] == len(calls) * min(batch, n)


class Quadrants(nn.Module):
    """A frozen 'encoder': each image's mean in each quadrant (where make_images' blob is: its class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 2).flatten(1)  # [B, 4C]


def test_cached_views_train_each_image_with_its_label():
    """augment 'none' trains the head on features computed once: on a shuffled subset (positions
    in `index` are not image ids) it must still pair every feature with its own label."""
    data = make_images(96, classes=4, seed=5)
    index = torch.randperm(96, generator=torch.Generator().manual_seed(1))[:64]
    head = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4))
    recipe = finetune.Recipe(epochs=40, batch_size=16, lr=0.5, schedule="constant", augment="none")
    done = finetune.train(Quadrants(), head, data, index, recipe, 16, fine_tune=False, seed=0)
    assert done["steps"] == 160
    top1 = finetune.test(Quadrants(), head, data, 16, 1.0)["top1"]
    assert top1 >= 65.0, top1  # measured 79.2; with the labels shuffled 25.0 (chance)


def test_flip_trains_on_each_image_and_its_mirror_and_fine_tuning_refuses_cached_views():
    data = make_images(32, classes=4, seed=2)
    seen = []
    encoder = Pool()
    encoder.register_forward_hook(lambda _m, args, _out: seen.append(args[0].clone()))
    recipe = finetune.Recipe(epochs=2, batch_size=8, lr=0.1, augment="flip")
    finetune.train(encoder, nn.Linear(2, 4), data, torch.arange(32), recipe, 16, fine_tune=False, seed=0)
    whole = finetune.center_view(data.images, 16, 1.0, data.mean, data.std)  # [32, 1, 16, 16]
    assert len(seen) == 2 and torch.equal(seen[0], whole) and torch.equal(seen[1], whole.flip(-1))
    with pytest.raises(ValueError, match="fine-tuning needs augment 'crop'"):
        finetune.train(encoder, nn.Linear(2, 4), data, torch.arange(32), recipe, 16, fine_tune=True, seed=0)
    with pytest.raises(ValueError, match="augment 'mixup' is not one of"):
        finetune.Recipe(epochs=1, batch_size=8, lr=0.1, augment="mixup")
    # the crop recipes keep their protocol ids (no new key); without crops the crop range is not a setting
    assert "augment" not in finetune.Recipe(epochs=1, batch_size=8, lr=0.1).params()
    assert {"augment": "flip"}.items() <= recipe.params().items() and "crop_scale" not in recipe.params()
    assert "crop_scale" not in finetune.Recipe(epochs=1, batch_size=8, lr=0.1, augment="none").params()


def test_precise_bn_sets_the_statistics_of_the_tested_views_and_leaves_the_frozen_encoder():
    data = make_images(48, classes=4, seed=3)
    encoder = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), Pool())
    encoder[1].running_mean.fill_(0.5)
    frozen = copy.deepcopy(encoder.state_dict())
    head = nn.Sequential(nn.BatchNorm1d(6, momentum=0.1), nn.Linear(6, 4))
    index = torch.arange(48)
    n = finetune.refresh_bn(encoder, head, data, index, 16, 1.0, fine_tune=False, batch_size=48)
    with torch.no_grad():
        feats = encoder.eval()(finetune.center_view(data.images, 16, 1.0, data.mean, data.std))  # [48, 6]
    assert n == 1
    assert torch.allclose(head[0].running_mean, feats.mean(0), atol=1e-6)
    assert torch.allclose(head[0].running_var, feats.var(0, unbiased=True), rtol=1e-5, atol=1e-7)
    assert head[0].momentum == 0.1  # restored
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in frozen.items())  # frozen: untouched
    assert finetune.refresh_bn(encoder, head, data, index, 16, 1.0, fine_tune=True, batch_size=48) == 2
    assert not torch.equal(encoder[1].running_mean, frozen["1.running_mean"])  # fine-tuned: refreshed too


def test_precise_bn_is_off_by_default_and_keeps_old_protocol_ids():
    off, on = PaperProbe(image_size=32), PaperProbe(image_size=32, precise_bn=True)
    assert "precise_bn" not in off.params() and on.params()["precise_bn"] is True
    assert "precise_bn" not in SemiSupervised(image_size=32).params()


def test_dry_run_prints_each_training_protocols_budget_from_its_settings(capsys):
    if not fmnist_available():
        pytest.skip("Fashion-MNIST IDX files absent")
    assert sweep.main(["gin/table_finetune.gin", "--dry-run", "--only", "supervised"]) == 0
    out = capsys.readouterr().out
    ginutil.parse(ginutil.run_files("supervised", "embedded", ["gin/table_finetune.gin"]))
    goyal = {k: gin.query_parameter(f"linear_goyal19/linear.PaperProbe.{k}") for k in ("train_size", "epochs")}
    steps = goyal["train_size"] // 256 * goyal["epochs"]  # drop-last batches of 256, every epoch
    assert f"linear/goyal19: {steps:,} steps x 256 ({steps * 256:,} images)" in out
    assert "semisup/simclr: 1%: " in out and "; 10%: " in out


def test_leaderboard_prints_the_steps_and_cpu_seconds_the_runs_recorded(tmp_path):
    table = tmp_path / "t"
    budget = {"batch": 256, "steps": 308, "images_seen": 78848}
    for i, cpu in enumerate([40.0, 44.0, 90.0]):
        folder = table / "runs" / f"r{i}"
        folder.mkdir(parents=True)
        run = {
            "run_id": f"r{i}",
            "pretrain_id": "p",
            "table": "t",
            "method": "m",
            "seed": i,
            "status": "done",
            "swept": {},
            "error": None,
            "log": None,
            "artefacts": {},
            "metrics": {"linear/goyal19/top1": 70.0 + i},
            "protocols": {
                "linear/goyal19": {
                    "id": "abcd1234",
                    "params": {"epochs": 28},
                    "metrics": ["linear/goyal19/top1"],
                    "selected": {"budget": budget},
                }
            },
            "timings": {"pretrain_s": 1.0, "eval_s": cpu, "protocols": {"linear/goyal19": {"s": cpu, "cpu_s": cpu}}},
        }
        (folder / "run.json").write_text(json.dumps(run))
    collate(table)
    md = (table / "leaderboard.md").read_text()
    assert "308 steps x 256 (78,848 images)" in md
    assert "| 44 (40-90)" in md  # median (range) of the three runs' CPU seconds


# --- the embedded recipes on a real encoder (slow) ----------------------------------------


@pytest.fixture(scope="module")
def fmnist_encoder(tmp_path_factory) -> Path:
    """A supervised ResNet-18 trained 60 steps on Fashion-MNIST by the harness (its export folder)."""
    if not fmnist_available():
        pytest.skip("Fashion-MNIST IDX files absent")
    root = tmp_path_factory.mktemp("enc")
    cmd = [
        sys.executable,
        "-m",
        "harness.sweep",
        "gin/table1.gin",
        "gin/scale/smoke.gin",
        "gin/launch/inprocess.gin",
        "--only",
        "supervised",
        "--bind",
        "table.Table.seeds = [0]",
        "--bind",
        "trainer.Trainer.max_steps = 60",
        "--bind",
        "data.FashionMNIST.pretrain_size = 4000",
        "--results",
        str(root),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(root.glob("pretrain/*/encoder.pt")).parent


@pytest.mark.slow
def test_embedded_recipes_measure_the_features(fmnist_encoder):
    """Goyal's probe (the embedded recipe, 300 epochs on whole images, on 1,000 images: 900
    steps) reaches 90 % of the fast probe on the same images, and SimCLR's fine-tuning (a
    quarter of the embedded epochs) on 10 % of the labels is not worse than on 1 %, beyond 3
    points. Measured on this encoder (2026-12-03): the fast probe 73.7; the probe 72.5 (0.98);
    the 84 crop steps of the recipe before (28 epochs, lr 0.1, 50-100 % crops) 58.9-62.0
    (0.80-0.84); the recipe before issue 13 (lr 0.01, 8-100 % crops, no Precise BN, the 87.5 %
    centre crop) 46.6 (0.63), and 12 steps of the embedded crop recipe 37.7 (0.51)."""
    ginutil.parse(
        ginutil.run_files("supervised", "embedded", ["gin/table_finetune.gin"]),
        [
            "linear_goyal19/linear.PaperProbe.train_size = 1000",
            "linear_goyal19/linear.PaperProbe.test_size = 1000",
            "semisup_simclr/semisup.SemiSupervised.epochs = [15, 1.25]",
            "semisup_simclr/semisup.SemiSupervised.test_size = 1000",
        ],
    )
    protocols = {p.name: p for p in ginutil.reference("job.run.evaluations")}
    goyal, semisup = protocols["linear/goyal19"], protocols["semisup/simclr"]
    data = FashionMNIST()
    train, test = data.split("train").subset(1000), data.split("test").subset(1000)
    ctx = Context(
        encoder=lambda: backbone_lib.load(fmnist_encoder),
        dataset=data,
        pretrain_dir=fmnist_encoder,
        features={},
        progress=False,
    )
    encoder = backbone_lib.load(fmnist_encoder).eval()
    with torch.no_grad():
        feats = {
            name: Features(
                encoder(finetune.center_view(s.images, goyal.image_size, 1.0, s.mean, s.std)).flatten(1), s.labels
            )
            for name, s in (("train", train), ("test", test))
        }
    fast = LinearProbe()(feats["train"], feats["test"])["linear/top1"]
    paper = goyal.evaluate(ctx)["linear/goyal19/top1"]
    print(f"fast {fast:.1f} paper {paper:.1f} ratio {paper / fast:.3f}")
    assert paper >= 0.9 * fast, (paper, fast)
    tuned = semisup.evaluate(ctx)
    assert tuned["semisup/simclr/10%/top1"] >= tuned["semisup/simclr/1%/top1"] - 3.0, tuned
    # Well above chance (10 %). Summation order moves it: above 50 on 2 threads (CI), 46.1 on one
    # (OMP_NUM_THREADS=1, 2026-12-04), so the bound sits below both.
    assert tuned["semisup/simclr/1%/top1"] > 35.0, tuned
