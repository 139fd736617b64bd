"""Named, versioned evaluation protocols: ids, perfect and constant features, retrieval by
hand, labelled subsets, fine-tuning on a copy, the leaderboard's protocol split, an
external encoder, and table2 end to end at the smoke scale."""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import gin
from harness import backbone as backbone_lib
from harness import ginutil, job, store
from harness.collate import collate, leaderboard, load_runs
from harness.data import DataError, ImageFolder, ImageSet
from harness.evals import Context, Features
from harness.evals import protocol as protocol_lib
from harness.evals.knn import KNN
from harness.evals.linear import LinearProbe, PaperProbe
from harness.evals.lowshot import LowShot
from harness.evals.retrieval import Retrieval
from harness.evals.semisup import SemiSupervised
from harness.evals.subsets import balanced_indices, per_class_for, read_subset_file
from harness.trainer import Trainer
from tests.conftest import REPO, TINY, fmnist_available, make_images
from tests.test_imagefolder import write_tree

CLASSES = 4
LEVELS = [40 + 50 * c for c in range(CLASSES)]  # grey level of each class's images


def flat_images(n: int, seed: int) -> ImageSet:
    """Uniform grey images whose level is the class (any crop or flip keeps it), balanced."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    images = torch.tensor(LEVELS, dtype=torch.uint8)[labels].view(n, 1, 1, 1).expand(n, 1, 20, 20).clone()
    images = images + torch.randint(0, 3, images.shape, generator=g, dtype=torch.uint8)  # a little noise
    return ImageSet(images, labels, [str(c) for c in range(CLASSES)], mean=(0.4,), std=(0.3,))


class Perfect(nn.Module):
    """One-hot of the class read off the image's mean level: perfect features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = (torch.tensor(LEVELS) / 255 - 0.4) / 0.3  # [C] normalised
        return F.one_hot((x.mean((1, 2, 3))[:, None] - levels).abs().argmin(1), CLASSES).float()  # [B, C]


class Constant(nn.Module):
    """The same feature vector for every image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(x), 8)


class Data:
    """A dataset object with the two splits protocols read."""

    name = "test"

    def __init__(self, train: ImageSet, test: ImageSet) -> None:
        self.splits = {"train": train, "test": test}

    def split(self, which: str) -> ImageSet:
        return self.splits[which]


def context(encoder: nn.Module, train: ImageSet | None = None, test: ImageSet | None = None) -> Context:
    data = Data(train or flat_images(160, 0), test or flat_images(80, 1))
    return Context(
        encoder=lambda: copy.deepcopy(encoder), dataset=data, pretrain_dir=Path("."), features={}, progress=False
    )


def one_hot_features(n: int, seed: int, noise: float = 0.01) -> Features:
    """One-hot class codes of 10 balanced classes plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    return Features(F.one_hot(y, 10).float() + noise * torch.randn(n, 10, generator=g), y)


# --- names, settings and ids ------------------------------------------------------------


def test_protocol_id_changes_with_a_setting_and_only_then():
    pid = protocol_lib.protocol_id
    assert len(pid(KNN())) == protocol_lib.ID_LENGTH
    assert pid(KNN()) == pid(KNN(ks=[200, 20], chunk_size=7))  # same settings; chunking changes no number
    assert pid(KNN()) != pid(KNN(temperature=0.1))
    assert pid(LinearProbe()) != pid(LinearProbe(max_iter=100))
    probe = PaperProbe(image_size=32)
    assert pid(probe) == pid(PaperProbe(image_size=32, milestones=[60, 80]))
    for change in (
        {"epochs": 5},
        {"lr": 3.0},
        {"norm": "bn"},
        {"image_size": 64},
        {"eval_crop": 1.0},
        {"name": "linear/other"},
        {"train_size": 1000},
    ):
        assert pid(PaperProbe(**{"image_size": 32, **change})) != pid(probe), change
    assert pid(SemiSupervised(image_size=32)) != pid(SemiSupervised(image_size=32, subset_seed=1))
    assert pid(LowShot()) != pid(LowShot(draws=3)) and pid(Retrieval()) != pid(Retrieval(ks=[1]))


def test_every_protocol_gin_file_makes_a_distinctly_named_protocol():
    protocols = []
    for path in sorted((REPO / "gin" / "protocols").glob("*.gin")):  # a paper recipe: one scoped protocol
        ginutil.parse([str(path)], ["IMAGE_SIZE = 32"])
        selector = next(
            (k for k in ("linear.PaperProbe", "semisup.SemiSupervised") if _bound(f"{path.stem}/{k}.name")), None
        )
        if selector is None:  # a protocol bound without a scope (the VOC files)
            continue
        with gin.config_scope(path.stem):
            protocols.append(gin.get_configurable(selector)())
    names = [p.name for p in protocols]
    assert len(set(names)) == len(names) == len(protocols) >= 4
    assert len({protocol_lib.protocol_id(p) for p in protocols}) == len(protocols)
    assert all(json.loads(json.dumps(p.params())) == protocol_lib.params_of(p) for p in protocols)


def _bound(key: str) -> bool:
    try:
        gin.query_parameter(key)
        return True
    except ValueError:
        return False


def test_two_protocols_with_one_name_are_refused():
    protocol_lib.check_names([KNN(), LinearProbe(), PaperProbe(image_size=32)])
    with pytest.raises(ValueError, match="more than one protocol named linear/mocov2"):
        protocol_lib.check_names([PaperProbe(image_size=32), PaperProbe(image_size=32, lr=1.0)])


# --- perfect features ~100 %, constant features chance ----------------------------------


def test_paper_probe_perfect_features_score_100_and_leave_the_encoder_frozen():
    probe = PaperProbe(image_size=16, epochs=20, lr=1.0, milestones=[15], batch_size=32)
    assert probe.evaluate(context(Perfect())) == {"linear/mocov2/top1": 100.0}  # 4 classes: no top-5
    torch.manual_seed(0)
    net = backbone_lib.create("test_resnet", in_chans=1)
    ctx = context(net)
    copies = []
    ctx.encoder = lambda: copies.append(copy.deepcopy(net)) or copies[-1]
    PaperProbe(image_size=16, epochs=1, lr=1.0, norm="bn_noaffine", optimizer="lars").evaluate(ctx)
    for (k, before), after in zip(net.state_dict().items(), copies[0].state_dict().values()):
        assert torch.equal(before, after), k  # frozen: eval-mode BatchNorm, no gradient step


@pytest.mark.parametrize("norm", ["none", "bn", "bn_noaffine"])
def test_paper_probe_constant_features_score_chance(norm):
    out = PaperProbe(image_size=16, epochs=2, lr=0.1, norm=norm, batch_size=32).evaluate(context(Constant()))
    assert out == {"linear/mocov2/top1": 100.0 / CLASSES}  # one prediction for all; test is balanced


def test_semisup_perfect_features_score_100_constant_features_chance():
    semisup = SemiSupervised(image_size=16, percents=[10, 50], epochs=[20, 10], batch_size=16, lr=0.5)
    assert semisup.evaluate(context(Perfect())) == {"semisup/simclr/10%/top1": 100.0, "semisup/simclr/50%/top1": 100.0}
    # 16 images at batch 16 for 20 epochs, 80 images (5 batches) for 10
    assert semisup.selected == {
        "10%": {
            "images": 16,
            "source": "class-balanced draw, seed 0",
            "budget": {"batch": 16, "steps": 20, "images_seen": 320},
        },
        "50%": {
            "images": 80,
            "source": "class-balanced draw, seed 0",
            "budget": {"batch": 16, "steps": 50, "images_seen": 800},
        },
    }
    out = semisup.evaluate(context(Constant()))
    assert set(out.values()) == {100.0 / CLASSES}


def test_lowshot_perfect_features_score_100_constant_features_chance():
    out = LowShot(ks=[1, 5], draws=3)(one_hot_features(200, 0), one_hot_features(100, 1))
    assert out == {
        "lowshot/logreg/k1/top1": 100.0,
        "lowshot/logreg/k1/top1_std": 0.0,
        "lowshot/logreg/k5/top1": 100.0,
        "lowshot/logreg/k5/top1_std": 0.0,
    }
    const = LowShot(ks=[1, 5], draws=3)(
        Features(torch.full((200, 16), 0.5), torch.arange(200) % 10),
        Features(torch.full((100, 16), 0.5), torch.arange(100) % 10),
    )
    assert const["lowshot/logreg/k5/top1"] == 10.0 and const["lowshot/logreg/k1/top1_std"] == 0.0


def test_lowshot_draws_differ_and_too_few_examples_fail_clearly():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 10
    noisy = Features(F.one_hot(y, 10).float() + 1.5 * torch.randn(300, 10, generator=g), y)
    out = LowShot(ks=[1], draws=4)(noisy, one_hot_features(200, 1, noise=1.5))
    assert out["lowshot/logreg/k1/top1_std"] > 0  # four different draws, four different fits
    with pytest.raises(ValueError, match="class 9 has 2 training items, fewer than k = 5"):
        LowShot(ks=[5])(
            Features(torch.randn(29, 4), torch.tensor([c for c in range(10) for _ in range(3)][:29])),
            one_hot_features(20, 1),
        )


def test_retrieval_perfect_features_and_constant_features():
    out = Retrieval(ks=[1, 5])(one_hot_features(200, 0), one_hot_features(100, 1))
    assert out == {"retrieval/cosine/R@1": 100.0, "retrieval/cosine/R@5": 100.0, "retrieval/cosine/mAP": 100.0}
    y = torch.arange(200) % 10
    const = Retrieval(ks=[1], chunk_size=7)(Features(torch.ones(200, 4), y), Features(torch.ones(50, 4), y[:50]))
    # Every similarity ties: the ranking is the gallery order 0, 1, 2, ...; only class-0 queries hit at rank 1.
    assert const["retrieval/cosine/R@1"] == 10.0
    assert 10.0 < const["retrieval/cosine/mAP"] < 13.0  # about the positive rate (10 %)


def test_retrieval_matches_a_hand_computed_ranking():
    # Gallery (class): g0 (A) at 0 deg, g1 (B) at 36.9, g2 (A) at 53.1, g3 (B) at 90 deg.
    gallery = Features(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]), torch.tensor([0, 1, 0, 1]))
    # Query A at 0 deg ranks g0 g1 g2 g3: relevant at ranks 1, 3 -> AP = (1/1 + 2/3) / 2 = 0.8333.
    # Query B at 53.1 deg (sims .6 .96 1 .8) ranks g2 g1 g3 g0: relevant at 2, 3 -> AP = (1/2 + 2/3) / 2 = 0.5833.
    queries = Features(torch.tensor([[2.0, 0.0], [0.6, 0.8]]), torch.tensor([0, 1]))
    out = Retrieval(ks=[1, 2])(gallery, queries)
    assert out["retrieval/cosine/R@1"] == 50.0 and out["retrieval/cosine/R@2"] == 100.0
    assert out["retrieval/cosine/mAP"] == pytest.approx(100 * (0.8333333 + 0.5833333) / 2)


# --- labelled subsets -------------------------------------------------------------------


def test_balanced_draw_is_balanced_and_reproducible():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 2 + [3] * 18)
    idx = balanced_indices(labels, 3, seed=7)
    assert torch.bincount(labels[idx]).tolist() == [3, 3, 2, 3]  # class 2 has only two
    assert len(set(idx.tolist())) == len(idx) and idx.tolist() == sorted(idx.tolist())
    assert torch.equal(idx, balanced_indices(labels, 3, seed=7))
    assert not torch.equal(idx, balanced_indices(labels, 3, seed=8))
    assert set(idx.tolist()) <= set(balanced_indices(labels, 10, seed=7).tolist())  # nested in k
    assert per_class_for(1, torch.arange(60000) % 10) == 60 and per_class_for(10, torch.arange(60000) % 10) == 600
    assert per_class_for(1, torch.arange(100) % 10) == 1  # at least one


def write_named_tree(root: Path, per_class: int = 3) -> None:
    """A tiny ImageNet-style tree with unique, ImageNet-like file names (n0000000<c>_<i>.JPEG)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3)).astype(np.uint8)).save(
                    folder / f"n0000000{c}_{i}.JPEG"
                )


def test_subset_file_selects_its_images_and_an_unknown_name_fails_clearly(tmp_path):
    write_named_tree(tmp_path / "tree")
    train = ImageFolder(root=str(tmp_path / "tree"), load_size=8).split("train")
    listing = tmp_path / "1percent.txt"
    listing.write_text("n00000001_2.JPEG\n\nn00000000_0.JPEG\n")
    idx = read_subset_file(listing, train)
    assert [Path(train.images.paths[i]).name for i in idx] == ["n00000000_0.JPEG", "n00000001_2.JPEG"]
    listing.write_text("n00000001_2.JPEG\nn00000000_0.JPEG\nn01440764_10026.JPEG\n")
    with pytest.raises(
        DataError,
        match=r"1percent.txt, line 3: image 'n01440764_10026.JPEG' is not in the training "
        r"split \(6 images under .*tree/train\).*Fix: bind `semisup.SemiSupervised",
    ):
        read_subset_file(listing, train)
    semisup = SemiSupervised(image_size=8, percents=[1], epochs=[1], subset_files=[str(listing)])
    with pytest.raises(DataError, match="line 3"):  # the protocol stops before it trains anything
        semisup.evaluate(
            Context(
                encoder=Constant,
                dataset=ImageFolder(root=str(tmp_path / "tree"), load_size=8),
                pretrain_dir=tmp_path,
                features={},
                progress=False,
            )
        )
    listing.write_text("n00000000_0.JPEG\nn00000000_0.JPEG\n")
    with pytest.raises(DataError, match="line 2: 'n00000000_0.JPEG' is listed twice"):
        read_subset_file(listing, train)
    with pytest.raises(DataError, match="subset file not found"):
        read_subset_file(tmp_path / "missing.txt", train)
    with pytest.raises(DataError, match="held as a tensor with no file names"):
        read_subset_file(listing, make_images())


def test_subset_file_against_duplicate_file_names_is_refused(tmp_path):
    write_tree(tmp_path)  # cat/0.png and dog/0.png: a name alone cannot say which
    train = ImageFolder(root=str(tmp_path), load_size=8).split("train")
    (tmp_path / "s.txt").write_text("0.png\n")
    with pytest.raises(DataError, match="line 1: '0.png' names 2 images"):
        read_subset_file(tmp_path / "s.txt", train)


# --- fine-tuning trains a copy, never the exported encoder ------------------------------


def test_semisup_fine_tunes_a_copy_and_leaves_the_exported_encoder(tmp_path):
    torch.manual_seed(0)
    backbone_lib.export(backbone_lib.create("test_resnet", in_chans=1), tmp_path)
    saved = (tmp_path / "encoder.pt").read_bytes()
    copies = []

    def fresh() -> nn.Module:
        copies.append(backbone_lib.load(tmp_path))
        return copies[-1]

    features = {"train": one_hot_features(10, 0), "test": one_hot_features(10, 1)}
    frozen_x = features["train"].x.clone()
    data = Data(make_images(64, classes=4, seed=0), make_images(32, classes=4, seed=1))
    ctx = Context(encoder=fresh, dataset=data, pretrain_dir=tmp_path, features=features, progress=False)
    SemiSupervised(image_size=32, percents=[25], epochs=[2], batch_size=8, lr=0.5).evaluate(ctx)
    original = backbone_lib.load(tmp_path).state_dict()
    tuned = copies[0].state_dict()
    changed = [k for k in original if not torch.equal(original[k], tuned[k])]
    assert any(k.endswith("weight") and "conv" in k for k in changed)  # the whole network trained
    assert (tmp_path / "encoder.pt").read_bytes() == saved  # the exported encoder did not
    assert torch.equal(features["train"].x, frozen_x)  # nor did the frozen features


# --- the leaderboard keeps protocol settings apart -------------------------------------


def write_run(table: Path, run_id: str, method: str, seed: int, metrics: dict, protocols: dict | None) -> None:
    folder = table / "runs" / run_id
    folder.mkdir(parents=True)
    run = {
        "run_id": run_id,
        "pretrain_id": f"p{run_id}",
        "table": "table2",
        "method": method,
        "seed": seed,
        "swept": {},
        "status": "done",
        "metrics": metrics,
        "timings": {"pretrain_s": 1.0, "eval_s": 1.0},
        "error": None,
        "log": None,
        "artefacts": {},
        "protocols": protocols or {},
    }
    (folder / "run.json").write_text(json.dumps(run))


def goyal(pid: str, epochs: int) -> dict:
    return {
        "linear/goyal19": {"id": pid, "params": {"epochs": epochs}, "metrics": ["linear/goyal19/top1"]},
        "knn/npid": {"id": "k0", "params": {"ks": [20]}, "metrics": ["knn/top1@20"]},
    }


def test_leaderboard_never_averages_two_protocol_ids(tmp_path):
    table = tmp_path / "table2"
    write_run(table, "a0", "simclr", 0, {"linear/goyal19/top1": 50.0, "knn/top1@20": 40.0}, goyal("aaaa1111", 7))
    write_run(table, "a1", "simclr", 1, {"linear/goyal19/top1": 70.0, "knn/top1@20": 42.0}, goyal("bbbb2222", 28))
    write_run(table, "b0", "rotnet", 0, {"linear/goyal19/top1": 30.0, "knn/top1@20": 20.0}, goyal("aaaa1111", 7))
    write_run(table, "b1", "rotnet", 1, {"linear/goyal19/top1": 34.0, "knn/top1@20": 22.0}, goyal("aaaa1111", 7))
    board = collate(table).set_index("method")
    assert "linear/goyal19/top1 mean" not in board  # never one column over both settings
    assert board.loc["simclr", "linear/goyal19/top1 [aaaa1111] mean"] == 50.0
    assert board.loc["simclr", "linear/goyal19/top1 [bbbb2222] mean"] == 70.0
    assert board.loc["rotnet", "linear/goyal19/top1 [aaaa1111] mean"] == 32.0
    assert math.isnan(board.loc["rotnet", "linear/goyal19/top1 [bbbb2222] mean"])
    assert board.loc["simclr", "knn/top1@20 mean"] == 41.0  # one id: averaged as usual, name unchanged
    md = (table / "leaderboard.md").read_text()
    protocols = md.split("## Protocols")[1]
    for pid, epochs in (("aaaa1111", 7), ("bbbb2222", 28)):
        row = rf"\| linear/goyal19 +\| {pid} +\| linear/goyal19/top1 +\| - +\| - +\| {{\"epochs\": {epochs}}}"
        assert re.search(row, protocols)
    assert re.search(r"\| knn/npid +\| k0 +\| knn/top1@20 ", protocols)


def test_runs_without_protocol_records_stay_apart_from_recorded_ones(tmp_path):
    table = tmp_path / "t"
    write_run(table, "o0", "simclr", 0, {"linear/goyal19/top1": 50.0}, None)  # records no protocol
    write_run(table, "n0", "simclr", 1, {"linear/goyal19/top1": 70.0}, goyal("aaaa1111", 7))
    board = leaderboard(load_runs(table)).set_index("method")
    assert board.loc["simclr", "linear/goyal19/top1 [unrecorded] mean"] == 50.0
    assert board.loc["simclr", "linear/goyal19/top1 [aaaa1111] mean"] == 70.0


# --- an encoder trained elsewhere --------------------------------------------------------


def _external(tmp_path: Path, state: dict, *bindings: str):
    torch.save(state, tmp_path / "state.pt")
    ginutil.parse(
        ginutil.run_files("external", "embedded"),
        [*TINY, f"external.External.path = '{tmp_path / 'state.pt'}'", *bindings],
    )
    return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), make_images(), 0)


def test_external_state_dict_is_evaluated_without_pretraining(tmp_path):
    torch.manual_seed(3)
    other = backbone_lib.create("test_resnet", in_chans=1)
    method, views = _external(tmp_path, other.state_dict())
    for k, v in other.state_dict().items():
        assert torch.equal(method.backbone.state_dict()[k], v), k
    assert method.pretrain_steps == 0 and method.encoder() is method.backbone

    class Split:
        name = "tiny"

        def split(self, which: str) -> ImageSet:
            return make_images()

    folder = tmp_path / "pre"
    record = job.pretrain(
        folder,
        ginutil.reference("job.run.method"),
        Split(),
        ginutil.reference("job.run.views"),
        Trainer(progress=False),
        seed=0,
    )
    assert record["steps"] == 0
    exported = store.load_torch(folder / "encoder.pt")
    assert all(torch.equal(exported[k], v) for k, v in other.state_dict().items())
    assert backbone_lib.load(folder)(torch.randn(2, 1, 32, 32)).shape == (2, other.num_features)


def test_external_adapts_an_rgb_classifier_checkpoint_and_names_a_misfit(tmp_path):
    import timm

    torch.manual_seed(4)
    rgb = timm.create_model("test_resnet", num_classes=10, in_chans=3)  # a timm checkpoint: head, RGB stem
    method, _ = _external(tmp_path, rgb.state_dict())
    stem = method.backbone.state_dict()["conv1.0.weight"]  # [out, 1, k, k]: the RGB weights summed
    assert torch.allclose(stem, rgb.state_dict()["conv1.0.weight"].sum(1, keepdim=True))
    misfit = r"does not fit the timm model test_resnet .*Fix: bind `external.External.model`"
    with pytest.raises(ValueError, match=misfit):
        _external(tmp_path, backbone_lib.create("resnet18", in_chans=1).state_dict())
    with pytest.raises(ValueError, match="external.External.path is not bound"):
        ginutil.parse(ginutil.run_files("external", "embedded"), TINY)
        job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), make_images(), 0)


# --- table2 end to end at the smoke scale ------------------------------------------------

SMOKE = [
    "linear.PaperProbe.max_steps = 2",
    "linear.PaperProbe.test_size = 200",
    "semisup.SemiSupervised.max_steps = 2",
    "semisup.SemiSupervised.test_size = 200",
    "lowshot.LowShot.draws = 2",
    "voc.EmbeddedVOC.images = 60",
    "voc.EmbeddedVOC.size = 64",
    "voc.VOC07SVM.image_size = 64",
    "voc_detection.Detection.iterations = 2",
    "voc_detection.Detection.batch_size = 2",
    "voc_detection.Detection.precise_bn_iters = 1",
    "voc_detection.Detection.test_images = 4",
    "voc_detection.Detection.min_size = [64]",
    "voc_detection.Detection.max_size = 64",
]


# (table, methods, protocols, the protocols each method's run records as skipped: semisup/mae's
# layer-wise decay needs a ViT's blocks, detection a ResNet's stages)
SMOKE_TABLES = [
    ("table2", ["supervised", "pixels", "mae"], 6, {}),
    ("table_finetune", ["supervised", "pixels"], 5, {"supervised": {"semisup/mae"}, "pixels": {"semisup/mae"}}),
    ("table_detection", ["supervised", "random"], 3, {}),
]


@pytest.mark.slow
@pytest.mark.skipif(
    not fmnist_available(),
    reason="Fashion-MNIST IDX files absent from "
    "/usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)",
)
@pytest.mark.parametrize("table,methods,count,skips", SMOKE_TABLES, ids=[t[0] for t in SMOKE_TABLES])
def test_protocol_tables_smoke_run_every_protocol_end_to_end(tmp_path, table, methods, count, skips):
    cmd = [
        sys.executable,
        "-m",
        "harness.sweep",
        f"gin/{table}.gin",
        "gin/scale/smoke.gin",
        "gin/launch/inprocess.gin",
        "--only",
        ",".join(methods),
        "--bind",
        "data.FashionMNIST.download = False",
        "--bind",
        "table.Table.seeds = [0]",
        *(a for b in SMOKE for a in ("--bind", b)),
        "--results",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ginutil.parse(ginutil.run_files("supervised", "embedded", [f"gin/{table}.gin", "gin/scale/smoke.gin"]), SMOKE)
    protocols = [ref.scoped_configurable_fn() for ref in gin.query_parameter("job.run.evaluations")]
    expected = {p.name: protocol_lib.protocol_id(p) for p in protocols}
    assert len(expected) == count
    runs = [json.loads(p.read_text()) for p in (tmp_path / table / "runs").glob("*/run.json")]
    assert sorted(r["method"] for r in runs) == sorted(methods)
    for run in runs:
        assert run["status"] == "done"
        assert {name: p["id"] for name, p in run["protocols"].items()} == expected
        skipped = {name for name, p in run["protocols"].items() if "skipped" in p}
        assert skipped == skips.get(run["method"], set())
        listed = [m for p in run["protocols"].values() for m in p["metrics"]]
        assert sorted(listed) == sorted(run["metrics"]) and all(0 <= v <= 100 for v in run["metrics"].values())
        trained = {name for name, p in run["protocols"].items() if "steps" in json.dumps(p.get("selected", {}))}
        assert trained == {p.name for p in protocols if hasattr(p, "budget")} - skipped  # each records its budget
    md = (tmp_path / table / "leaderboard.md").read_text()
    assert all(f"| {name}" in md and pid in md for name, pid in expected.items())


class _TinySet:
    """A dataset object as job.run sees one: tiny generated splits."""

    name = "tiny"

    def split(self, which: str):
        from tests.conftest import make_images

        return make_images(32, seed=0 if which != "test" else 1)


class _Refuses:
    """A protocol that cannot read this encoder (like detection on a ViT)."""

    name, frozen = "refuses/always", False

    def params(self) -> dict:
        return {}

    def evaluate(self, ctx) -> dict:
        from methods.base import Unsupported

        raise Unsupported("refuses/always cannot read this encoder")


def test_a_protocol_that_refuses_the_encoder_is_recorded_and_the_others_still_run(tmp_path):
    from harness import ginutil, job
    from harness.evals.features import FrozenFeatures
    from harness.evals.knn import KNN
    from harness.runspec import RunSpec
    from harness.trainer import Trainer
    from tests.conftest import parse_method

    parse_method("pixels")
    spec = RunSpec(
        table="t",
        method="pixels",
        seed=0,
        gin_files=(),
        bindings=(),
        pretrain_id="p0",
        run_id="r0",
        results=str(tmp_path),
    )
    record = job.run(
        spec,
        method=ginutil.reference("job.run.method"),
        dataset=_TinySet(),
        views=ginutil.reference("job.run.views"),
        trainer=Trainer(progress=False),
        features=FrozenFeatures(image_size=32),
        evaluations=[_Refuses(), KNN()],
    )
    assert record["status"] == "done" and "knn/top1@20" in record["metrics"]
    assert record["protocols"]["refuses/always"]["skipped"] == "refuses/always cannot read this encoder"
    assert "id" in record["protocols"]["refuses/always"]
