"""VOC protocols: the generated VOCdevkit tree read back through torchvision, the VOC07
11-point AP by hand, SVMs on perfect and constant features, a detection fine-tune smoke."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import VOCDetection

import gin
from harness import backbone, vocgen
from harness.data import FMNIST_CLASSES, DataError, FashionMNIST, ImageSet
from harness.evals import Context, voc
from harness.evals.voc import (
    VOC07SVM,
    EmbeddedVOC,
    image_labels,
    l2_normalize,
    ranking_ap,
    svm_voc07,
    voc07_ap,
    voc_classes,
)
from harness.evals.voc_detection import Detection, VOCBoxes, c4_parts, detection_ap
from methods.base import Unsupported
from tests.conftest import fmnist_available

needs_fmnist = pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST files not installed")


@pytest.fixture(scope="module")
def fmnist() -> FashionMNIST:
    return FashionMNIST(download=False)  # splits are cached in this object: read once per module


@pytest.fixture(scope="module")
def tree(tmp_path_factory, fmnist) -> tuple[Path, list]:
    if not fmnist_available():
        pytest.skip("Fashion-MNIST files not installed")
    root = tmp_path_factory.mktemp("voc") / "tree"
    return root, vocgen.generate(root, images=16, size=64, seed=0, dataset=fmnist)


class _Stats:
    """The run's dataset as the VOC protocols see it: only the pretraining statistics."""

    def split(self, which: str) -> ImageSet:
        return ImageSet(
            torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), ["x"], (0.3,), (0.35,)
        )


def _ctx(tmp_path: Path, encoder=None) -> Context:
    make = encoder or (lambda: backbone.create("test_resnet", in_chans=1))
    return Context(
        encoder=make,
        dataset=_Stats(),
        pretrain_dir=tmp_path / "results" / "pretrain" / "abc",
        features={},
        progress=False,
    )


# --- the generator ------------------------------------------------------------------


def test_generated_tree_loads_unchanged_through_vocdetection(tree):
    root, canvases = tree
    placed = {c.id: c for c in canvases}
    seen = set()
    for split in ("trainval", "test"):
        ds = VOCDetection(str(root), year="2007", image_set=split, download=False)
        for k in range(len(ds)):
            image, target = ds[k]
            ann = target["annotation"]
            canvas = placed[ann["filename"][:-4]]
            assert canvas.split == split and image.size == (64, 64) and image.mode == "RGB"
            assert (ann["size"]["width"], ann["size"]["height"], ann["size"]["depth"]) == ("64", "64", "3")
            got = [
                (
                    o["name"],
                    *(int(o["bndbox"][key]) for key in ("xmin", "ymin", "xmax", "ymax")),
                    int(o["truncated"]),
                    int(o["difficult"]),
                    o["pose"],
                )
                for o in ann["object"]
            ]
            want = [
                (it.name, it.xmin, it.ymin, it.xmax, it.ymax, it.truncated, it.difficult, "Unspecified")
                for it in canvas.items
            ]
            assert got == want and len(got) >= 1
            assert all(1 <= it.xmin <= it.xmax <= 64 and 1 <= it.ymin <= it.ymax <= 64 for it in canvas.items)
            seen.add(canvas.id)
    assert seen == set(placed) and len(placed) == 16
    assert voc_classes(root) == sorted(vocgen.safe_name(c) for c in FMNIST_CLASSES)
    assert "tshirttop" in voc_classes(root) and "ankleboot" in voc_classes(root)


def test_image_lists_follow_the_voc_conventions(tree):
    root, canvases = tree
    main = root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    lists = {s: (main / f"{s}.txt").read_text().split() for s in ("train", "val", "trainval", "test")}
    assert sorted(lists["train"] + lists["val"]) == sorted(lists["trainval"])
    assert not set(lists["trainval"]) & set(lists["test"]) and len(lists["trainval"]) == len(lists["test"]) == 8
    classes = voc_classes(root)
    for split in ("trainval", "test"):
        ids, labels = image_labels(root, split, classes)
        assert ids == lists[split]
        by_id = {c.id: c for c in canvases}
        for i, image_id in enumerate(ids):
            for c, cls in enumerate(classes):
                mine = [it for it in by_id[image_id].items if it.name == cls]
                want = 1 if any(not it.difficult for it in mine) else (0 if mine else -1)
                assert labels[i, c] == want
    line = (main / f"{classes[0]}_test.txt").read_text().splitlines()[0]
    assert len(line.split()) == 2 and line.split()[1] in ("1", "-1", "0")


def test_generation_is_deterministic_from_the_seed(tmp_path, fmnist):
    if not fmnist_available():
        pytest.skip("Fashion-MNIST files not installed")

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        vocgen.generate(tmp_path / name, images=6, size=48, seed=seed, dataset=fmnist)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b and len(a) > 40
    assert a.keys() == c.keys() and a != c


def test_failed_generation_leaves_no_partial_tree(tmp_path, fmnist, monkeypatch):
    if not fmnist_available():
        pytest.skip("Fashion-MNIST files not installed")
    calls = []

    def broken(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return "<annotation/>"

    monkeypatch.setattr(vocgen, "annotation_xml", broken)
    with pytest.raises(OSError, match="disk full"):
        vocgen.generate(tmp_path / "voc", images=6, size=32, dataset=fmnist)
    assert list(tmp_path.iterdir()) == []  # neither the tree nor its temp folder
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):  # an unwritable target: its parent is a file
        vocgen.generate(tmp_path / "file" / "voc", images=4, size=32, dataset=fmnist)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        vocgen.generate(tmp_path / "full", images=4, size=32, dataset=fmnist)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


# --- average precision ----------------------------------------------------------------


def test_voc07_ap_matches_a_hand_computed_example():
    # ranked: +, -, +, -, -  -> (recall, precision) = (.5, 1), (.5, .5), (1, 2/3), (1, .5), (1, .4)
    # recall >= 0, .1, .., .5: best precision 1 (6 points); >= .6, .., 1: 2/3 (5 points)
    want = (6 * 1 + 5 * 2 / 3) / 11
    assert voc07_ap([0.5, 0.5, 1, 1, 1], [1, 0.5, 2 / 3, 0.5, 0.4]) == pytest.approx(want)
    assert ranking_ap([0.9, 0.8, 0.7, 0.6, 0.5], [1, -1, 1, -1, -1]) == pytest.approx(want)
    # a difficult image (label 0) is ignored wherever it ranks
    assert ranking_ap([0.95, 0.9, 0.8, 0.7, 0.6, 0.5], [0, 1, -1, 1, -1, -1]) == pytest.approx(want)
    assert voc07_ap([0.25, 0.5], [1.0, 1.0]) == pytest.approx(6 / 11)  # recall never passes 0.5


def test_ap_is_one_for_a_perfect_ranking_and_the_positive_rate_for_constant_scores():
    labels = [1, -1, -1, 1, -1, 0, -1, 1]
    assert ranking_ap([8, 1, 2, 7, 3, 9, 4, 6], labels) == pytest.approx(1.0)
    assert ranking_ap([0.5] * 8, labels) == pytest.approx(3 / 7)  # 3 positives among 7 non-difficult
    assert math.isnan(ranking_ap([1, 2], [-1, 0]))


def test_detection_ap_matches_a_hand_computed_example():
    gts = {
        0: (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([False, True])),
        1: (np.array([[0, 0, 10, 10]], float), np.array([False])),
    }
    a, b = [0, 0, 10, 10], [20, 20, 30, 30]
    dets = [(0.9, 0, a), (0.8, 0, a), (0.7, 0, b), (0.6, 1, [50, 50, 60, 60]), (0.5, 1, [0, 0, 10, 9])]
    scores, images, boxes = (np.array([d[i] for d in dets], float) for i in range(3))
    # TP (.5, 1), duplicate FP (.5, .5), difficult ignored, FP (.5, 1/3), TP (1, .5)
    ap50, ap95 = detection_ap(scores, images.astype(int), boxes, gts, (0.5, 0.95))
    assert ap50 == pytest.approx((6 * 1 + 5 * 0.5) / 11)
    # IoU 0.9 of the last box fails 0.95: recall stays at .5 with precision 1 at the top
    assert ap95 == pytest.approx(6 / 11)
    perfect = detection_ap(np.array([0.9, 0.8]), np.array([0, 1]), np.array([a, a], float), gts)
    assert perfect == [pytest.approx(1.0)]
    assert math.isnan(detection_ap(np.array([]), np.array([], int), np.zeros((0, 4)), {})[0])


# --- VOC07 SVM --------------------------------------------------------------------------


def _labels(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    y = np.where(rng.random((n, classes)) < 0.3, 1, -1)
    y[rng.random((n, classes)) < 0.05] = 0  # a few difficult
    y[:2] = 1  # every class has positives
    return y


def test_svm_scores_about_100_on_perfect_features_and_the_positive_rate_on_constant_ones():
    rng = np.random.default_rng(0)
    train_y, test_y = _labels(rng, 60, 3), _labels(rng, 40, 3)
    perfect = lambda y: l2_normalize(np.where(y == 1, 1.0, -1.0) + 0.01 * rng.random(y.shape))  # noqa: E731
    aps, costs = svm_voc07(perfect(train_y), train_y, perfect(test_y), test_y)
    assert min(aps) > 0.99 and all(c is not None for c in costs)
    aps, _ = svm_voc07(l2_normalize(np.ones((60, 4))), train_y, l2_normalize(np.ones((40, 4))), test_y)
    rate = [((test_y[:, c] == 1).sum() / (test_y[:, c] != 0).sum()) for c in range(3)]
    assert aps == pytest.approx(rate)


def test_svms_fit_in_the_training_span_score_as_on_the_full_width(monkeypatch):
    rng = np.random.default_rng(1)
    train_y, test_y = _labels(rng, 50, 3), _labels(rng, 30, 3)
    wide = lambda y: l2_normalize(rng.normal(size=(len(y), 400)) + 0.5 * y[:, :1])  # noqa: E731  # 400 > 50 images
    train_x, test_x = wide(train_y), wide(test_y)
    narrow, _ = voc.training_span(train_x, test_x)
    assert narrow.shape == (50, 50)
    projected = svm_voc07(train_x, train_y, test_x, test_y, costs=(0.01, 0.1, 1.0, 10.0))
    monkeypatch.setattr(voc, "training_span", lambda a, b: (a, b))
    full = svm_voc07(train_x, train_y, test_x, test_y, costs=(0.01, 0.1, 1.0, 10.0))
    assert projected[1] == full[1] and projected[0] == pytest.approx(full[0], abs=1e-6)
    assert len(set(np.round(full[0], 6))) > 1  # the check compares different APs, not one constant


@needs_fmnist
def test_svm_protocol_runs_on_a_generated_tree_and_caches_its_features(tree, tmp_path):
    root, _ = tree
    protocol = VOC07SVM(root=str(root), image_size=32, costs=(0.1, 1.0), per_class=True)
    out = protocol.evaluate(_ctx(tmp_path))
    assert 0 <= out["svm/voc07/mAP"] <= 100 and any(k.startswith("svm/voc07/AP/") for k in out)
    assert set(protocol.selected["cost"]) == set(voc_classes(root))
    cached = sorted((tmp_path / "results" / "pretrain" / "abc" / "features").glob("voc07-*.pt"))
    assert len(cached) == 2
    torch.manual_seed(123)
    other = backbone.create("test_resnet", in_chans=1)  # other weights: equal numbers only from the cache
    assert protocol.evaluate(_ctx(tmp_path, encoder=lambda: other)) == out
    json.dumps(protocol.params())


@needs_fmnist
def test_svm_protocol_reads_larger_canvases_with_a_vit_built_for_small_images_and_with_raw_pixels(tree, tmp_path):
    root, _ = tree  # 64-px canvases; the ViT was built for 32-px images (MAE's embedded encoder)
    torch.manual_seed(0)
    vit = backbone.create("vit_tiny_patch16_224", in_chans=1, img_size=32, patch_size=4, depth=1)
    out = VOC07SVM(root=str(root), image_size=64, costs=(1.0,)).evaluate(_ctx(tmp_path / "vit", lambda: vit))
    assert 0 <= out["svm/voc07/mAP"] <= 100
    assert tuple(vit.patch_embed.img_size) == (64, 64) and vit.pos_embed.shape[1] == 1 + 16 * 16
    flat = torch.nn.Flatten()  # raw pixels: no convolution says how many channels; the data's count is read
    out = VOC07SVM(root=str(root), image_size=16, costs=(1.0,)).evaluate(_ctx(tmp_path / "pixels", lambda: flat))
    assert 0 <= out["svm/voc07/mAP"] <= 100
    x = torch.load(next((tmp_path / "pixels" / "results").rglob("voc07-*.pt")))["x"]
    assert x.shape[1] == 16 * 16  # one grayscale channel, as the encoder's pretraining data


def test_fit_input_size_resamples_a_vit_and_leaves_a_cnn_alone():
    torch.manual_seed(0)
    vit = backbone.create("vit_tiny_patch16_224", in_chans=1, img_size=32, patch_size=4, depth=1).eval()
    x = torch.randn(2, 1, 32, 32)
    before = vit(x)
    with pytest.raises(Exception):
        vit(torch.randn(2, 1, 48, 48))
    backbone.fit_input_size(vit, 48)
    assert vit(torch.randn(2, 1, 48, 48)).shape == before.shape
    backbone.fit_input_size(vit, 32)  # back at its size, bicubic resampling both ways keeps the grid close
    assert torch.allclose(vit(x), before, atol=0.5)
    cnn = backbone.create("test_resnet", in_chans=1)
    assert backbone.fit_input_size(cnn, 48) is cnn


def test_detection_skips_an_encoder_without_resnet_stages_before_reading_any_data(tmp_path):
    with pytest.raises(Unsupported, match="ResNet-style timm backbone.*Flatten has no conv1"):
        Detection(root=str(tmp_path / "absent")).evaluate(_ctx(tmp_path, encoder=lambda: torch.nn.Flatten()))


def test_a_missing_voc_root_fails_naming_the_key_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"voc\.VOC07SVM\.root is not set.*python -m harness\.vocgen"):
        VOC07SVM().evaluate(_ctx(tmp_path))
    with pytest.raises(DataError, match=r"voc_detection\.Detection\.root = .*no VOCdevkit/VOC2007"):
        Detection(root=str(tmp_path)).evaluate(_ctx(tmp_path))


@needs_fmnist
def test_the_embedded_tree_is_generated_once_under_the_results_folder(tmp_path):
    gin.bind_parameter("voc.EmbeddedVOC.images", 4)
    gin.bind_parameter("voc.EmbeddedVOC.size", 32)
    first = EmbeddedVOC().root(tmp_path / "results")
    stamp = (first / "vocgen.json").stat().st_mtime_ns
    assert first.parent == tmp_path / "results" / "data" and (first / "VOCdevkit" / "VOC2007" / "Annotations").is_dir()
    assert EmbeddedVOC().root(tmp_path / "results") == first and (first / "vocgen.json").stat().st_mtime_ns == stamp
    assert VOC07SVM(generate_embedded=True).params()["embedded"]["images"] == 4
    gin.bind_parameter("voc.EmbeddedVOC.seed", 1)
    assert EmbeddedVOC().root(tmp_path / "results") != first  # other settings, another tree


# --- detection ---------------------------------------------------------------------------


@needs_fmnist
def test_detection_reads_voc_boxes_as_detectron2_does(tree):
    root, canvases = tree
    data = VOCBoxes(root, [("2007", "test")], voc_classes(root), channels=1)
    x, boxes, labels, difficult = data[0]
    canvas = next(c for c in canvases if c.split == "test")
    assert x.shape == (1, 64, 64) and 0 <= x.min() and x.max() <= 1
    want = torch.tensor([[it.xmin - 1, it.ymin - 1, it.xmax, it.ymax] for it in canvas.items], dtype=torch.float32)
    assert torch.equal(boxes, want)
    assert labels.tolist() == [voc_classes(root).index(it.name) + 1 for it in canvas.items]
    assert difficult.tolist() == [bool(it.difficult) for it in canvas.items]


def test_c4_split_refuses_a_backbone_without_resnet_stages():
    with pytest.raises(Unsupported, match="ResNet-style timm backbone.*no conv1"):
        c4_parts(torch.nn.Linear(3, 3))


@needs_fmnist
def test_detection_fine_tunes_the_backbone_and_reports_voc07_aps(tree, tmp_path):
    root, _ = tree
    torch.manual_seed(0)
    encoder = backbone.create("test_resnet", in_chans=1)
    before = encoder.layer1[0].conv1.weight.detach().clone()
    protocol = Detection(
        root=str(root),
        iterations=4,
        batch_size=2,
        warmup_iters=2,
        min_size=(64,),
        max_size=64,
        anchor_sizes=(16, 32),
        pooled_size=2,
        rpn_batch_size=32,
        rpn_pre_nms_train=100,
        rpn_post_nms_train=20,
        rpn_pre_nms_test=50,
        rpn_post_nms_test=10,
        box_batch_size=8,
        precise_bn_iters=1,
        test_images=4,
        test_batch_size=4,
    )
    out = protocol.evaluate(_ctx(tmp_path, encoder=lambda: encoder))
    assert len(protocol.losses) == 4 and all(math.isfinite(v) for v in protocol.losses)
    assert set(out) == {"detection/voc07/AP50", "detection/voc07/AP75", "detection/voc07/AP"}
    assert all(0 <= v <= 100 for v in out.values())
    assert out["detection/voc07/AP50"] >= out["detection/voc07/AP75"]
    assert protocol.selected["test_images"] == 4 and set(protocol.selected["AP50"]) == set(voc_classes(root))
    assert not torch.equal(encoder.layer1[0].conv1.weight, before)  # the pretrained weights are fine-tuned
    json.dumps(protocol.params())
