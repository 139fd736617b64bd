"""PASCAL VOC 2007 classification with linear SVMs on frozen features, and what the VOC
protocols share: the VOC07 11-point AP, reading a VOCdevkit tree, the embedded tree.

`VOC07SVM` follows Goyal et al. 2019, "Scaling and Benchmarking Self-Supervised Visual
Representation Learning" (ICCV), as their benchmark code does it
(github.com/facebookresearch/fair_self_supervision_benchmark, tools/svm): every image
resized whole to a square (their ``global_resize`` to 224), one frozen feature vector
per image, features L2-normalised per image, one linear SVM per class (liblinear,
squared hinge, L2 penalty, class weights 2 for positives and 1 for negatives, tol 1e-4,
at most 2000 iterations), its cost chosen per class by the mean average precision of a
3-fold stratified cross-validation on trainval over the cost grid, refitted on all of
trainval and scored on test with ``difficult`` images ignored. As in their code,
difficult trainval images are negatives when training. Test AP is the VOC07 devkit's
11-point interpolated AP (their code reports the area under the interpolated curve
instead, VOC2010's measure); cross-validation scores use scikit-learn's average
precision as theirs did.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Sequence

import gin
import numpy as np
import torch
from torch import nn

from harness import backbone, ginutil, store
from harness.data import DataError, ImageSet
from harness.evals import Context, Features
from harness.evals.features import extract

GENERATE_HINT = "python -m harness.vocgen DIR"


# --- average precision ------------------------------------------------------------

def voc07_ap(recall: Sequence[float], precision: Sequence[float]) -> float:
    """The VOC2007 devkit's 11-point interpolated AP: the mean over t = 0, 0.1, ..., 1 of
    the highest precision at recall >= t (0 where recall never reaches t).

    Args:
        recall: recall after each ranked prediction (non-decreasing), ``[K]``.
        precision: precision after the same predictions, ``[K]``.
    """
    rec, prec = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    points = [prec[rec >= t].max() if (rec >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
    return float(np.mean(points))


def pr_curve(scores: np.ndarray, tp: np.ndarray, fp: np.ndarray, positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision at each distinct score, predictions taken highest score first.

    Equal scores form one step (scikit-learn's convention): the ranking among ties, which
    the devkit leaves to the input order, never changes the AP.
    """
    order = np.argsort(-scores, kind="stable")
    s, tp, fp = scores[order], np.cumsum(tp[order]), np.cumsum(fp[order])
    last = np.r_[s[1:] != s[:-1], True]  # the last prediction of each run of equal scores
    tp, fp = tp[last], fp[last]
    return tp / positives, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)


def ranking_ap(scores: Sequence[float], labels: Sequence[int]) -> float:
    """VOC07 classification AP of one class: labels 1 (present), -1 (absent), 0 (difficult,
    ignored as in the devkit's ``VOCevalcls``). NaN when no image is positive."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels)
    keep = y != 0
    s, y = s[keep], y[keep]
    if not (y > 0).any():
        return math.nan
    return voc07_ap(*pr_curve(s, (y > 0).astype(np.float64), (y < 0).astype(np.float64), int((y > 0).sum())))


# --- reading a VOCdevkit tree -----------------------------------------------------

def voc_dir(root: Path, year: str = "2007") -> Path:
    return Path(root) / "VOCdevkit" / f"VOC{year}"


def resolve_root(root: str | None, generate_embedded: bool, ctx: Context, key: str) -> Path:
    """The folder holding ``VOCdevkit/VOC2007`` (torchvision's VOC ``root``).

    `key` is the protocol's gin name (``voc.VOC07SVM``), for the error messages.
    """
    if root:
        path = Path(root).expanduser()
        if path.name == "VOCdevkit" and (path / "VOC2007").is_dir():
            path = path.parent
        elif path.name == "VOC2007" and path.parent.name == "VOCdevkit":
            path = path.parent.parent
        if not voc_dir(path).is_dir():
            raise DataError(f"{key}.root = {root!r}: no VOCdevkit/VOC2007 folder there. Fix: bind it to the folder "
                            f"holding VOCdevkit/ (real PASCAL VOC), or make one: `{GENERATE_HINT}`")
        return path
    if generate_embedded:
        return EmbeddedVOC().root(Path(ctx.pretrain_dir).parent.parent)
    raise DataError(f"{key}.root is not set: this protocol reads a PASCAL VOC tree (VOCdevkit/VOC2007). Fix: bind "
                    f"`{key}.root = '<folder holding VOCdevkit/>'` (real VOC, or one made by `{GENERATE_HINT}`), or "
                    f"`{key}.generate_embedded = True` to generate the Fashion-MNIST one under the results folder")


def voc_classes(root: Path) -> list[str]:
    """Class names of a tree, from its ``ImageSets/Main/<class>_trainval.txt`` files, sorted."""
    main = voc_dir(root) / "ImageSets" / "Main"
    classes = sorted(p.name[: -len("_trainval.txt")] for p in main.glob("*_trainval.txt"))
    if not classes:
        raise DataError(f"{main}: no <class>_trainval.txt lists; a VOC tree needs one per class ({GENERATE_HINT} "
                        "writes them)")
    return classes


def image_labels(root: Path, split: str, classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Image ids of a split (``ImageSets/Main/<split>.txt``) and their labels ``[N, C]``
    from the per-class lists: 1 present, -1 absent, 0 difficult only."""
    main = voc_dir(root) / "ImageSets" / "Main"
    try:
        ids = (main / f"{split}.txt").read_text().split()
    except OSError as err:
        raise DataError(f"{main / f'{split}.txt'}: cannot read the {split} list ({err})") from err
    index = {image_id: i for i, image_id in enumerate(ids)}
    labels = np.full((len(ids), len(classes)), -2, np.int8)
    for c, cls in enumerate(classes):
        path = main / f"{cls}_{split}.txt"
        try:
            rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
            for image_id, value in rows:
                labels[index[image_id], c] = int(value)
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{path}: unreadable or not matching {split}.txt ({type(err).__name__}: {err})") from err
    if (labels == -2).any():
        c = int(np.nonzero((labels == -2).any(0))[0][0])
        raise DataError(f"{main / f'{classes[c]}_{split}.txt'}: lists fewer images than {split}.txt")
    return ids, labels


class ResizedImages:
    """VOC images decoded when sliced, each resized whole to ``size x size`` (Goyal et
    al.'s ``global_resize``): ``images[a:b]`` is uint8 ``[B, C, S, S]``."""

    def __init__(self, paths: Sequence[Path], size: int, channels: int):
        self.paths, self.size, self.channels = list(paths), size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, path: Path) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L").resize((self.size, self.size), Image.BILINEAR)
                arr = np.asarray(im, np.uint8).reshape(self.size, self.size, self.channels)
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"{path}: cannot decode image ({err})") from err
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [C, S, S]

    def __getitem__(self, idx: slice) -> torch.Tensor:
        return torch.stack([self.load(p) for p in self.paths[idx]])


def in_channels(encoder: nn.Module, default: int = 3) -> int:
    """Input channels of an encoder (its timm spec, else its first convolution, else
    `default`: an encoder without convolutions, like raw pixels, reads what it is given)."""
    spec = getattr(encoder, "sslbench_spec", None)
    if spec and "in_chans" in spec:
        return int(spec["in_chans"])
    conv = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else default


def pixel_stats(ctx: Context, channels: int, mean: Sequence[float] | None,
                std: Sequence[float] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation for VOC images: the bound values, else the pretraining data's (what
    the encoder was trained on, as transfer protocols use ImageNet's on VOC)."""
    if mean is None or std is None:
        data = ctx.dataset.split("train")
        mean, std = mean or data.mean, std or data.std
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"VOC protocol: mean/std have {len(mean)}/{len(std)} values for a {channels}-channel encoder")
    return tuple(map(float, mean)), tuple(map(float, std))


@gin.configurable(module="voc")
class EmbeddedVOC:
    """The generated Fashion-MNIST VOC tree used when a VOC protocol has no ``root``
    (harness.vocgen), made once per results folder: ``<results>/data/voc-fmnist-<hash>``.

    Args:
        images: canvases in all (half test).
        size: canvas side in pixels.
        seed: the generator's seed (the same tree for every run of a table).
        max_items: most items per canvas.
    """

    def __init__(self, images: int = 1000, size: int = 128, seed: int = 0, max_items: int = 4):
        self.images, self.size, self.seed, self.max_items = images, size, seed, max_items

    def params(self) -> dict:
        return {"images": self.images, "size": self.size, "seed": self.seed, "max_items": self.max_items}

    def root(self, results: Path) -> Path:
        """Generates the tree under ``results/data`` unless it is there; returns its root."""
        from harness import vocgen
        folder = Path(results) / "data" / f"voc-fmnist-{ginutil.digest([json.dumps(self.params(), sort_keys=True)])}"
        with store.locked(folder.parent):  # two runs starting together generate it once
            if not (folder / "vocgen.json").is_file():
                print(f"generating the embedded VOC tree in {folder}", flush=True)
                vocgen.generate(folder, self.images, self.size, self.seed, self.max_items)
        return folder


# --- VOC07 classification with linear SVMs ------------------------------------------

GOYAL_COSTS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, *(0.5 ** k for k in range(4, 20)))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Per-row L2 normalisation as in Goyal et al.'s code (``x / (||x|| + 1e-5)``)."""
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)


def training_span(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets in coordinates of an orthonormal basis of the training features'
    span, when that is smaller than their width (raw pixels: 16,384 values for 500 images).
    A linear SVM's weights lie in that span (the representer theorem; liblinear's dual
    solver only sees inner products, which the basis keeps), so every fit, including the
    cross-validation folds whose samples are a subset, scores as it would on the full
    width, at the cost of an SVD: ``[N, D], [M, D] -> [N, r], [M, r]`` with r <= N."""
    if train_x.shape[1] <= train_x.shape[0]:
        return train_x, test_x
    _, sv, vt = np.linalg.svd(train_x, full_matrices=False)  # vt [N, D]
    basis = vt[sv > sv.max() * max(train_x.shape) * np.finfo(train_x.dtype).eps]  # [r, D]
    return train_x @ basis.T, test_x @ basis.T


def svm_voc07(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
              costs: Sequence[float] = GOYAL_COSTS, folds: int = 3, positive_weight: float = 2.0,
              max_iter: int = 2000) -> tuple[list[float], list[float | None]]:
    """Per-class linear SVMs: cost by k-fold cross-validation on train, AP on test.

    Args:
        train_x: features ``[N, D]`` (normalised by the caller).
        train_y: VOC labels ``[N, C]``: 1 present, -1 absent, 0 difficult (a negative here).
        test_x: features ``[M, D]``.
        test_y: labels ``[M, C]``; difficult (0) images are left out of the AP.
        costs: the grid, in the order ties are broken (the first best wins).
        folds: cross-validation folds (fewer when a class has fewer positives or negatives;
            with fewer than 2 the middle cost of the sorted grid is taken).
        positive_weight: class weight of positives (negatives 1).
        max_iter: liblinear's iteration cap.

    Returns:
        Test AP per class (NaN for a class without test positives) and the chosen cost per
        class (None for a class without train positives: its scores are constant).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import LinearSVC

    def svm(cost: float) -> LinearSVC:
        return LinearSVC(C=cost, class_weight={1: positive_weight, -1: 1}, loss="squared_hinge", penalty="l2",
                         dual=True, tol=1e-4, max_iter=max_iter, intercept_scaling=1.0,
                         random_state=0)

    train_x, test_x = training_span(train_x, test_x)  # the same scores, a dimension per training image at most
    aps, chosen = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tiny costs stop at max_iter, as in their runs
        for c in range(train_y.shape[1]):
            y = np.where(train_y[:, c] == 1, 1, -1)
            pos, neg = int((y == 1).sum()), int((y == -1).sum())
            if pos == 0 or neg == 0:
                scores, cost = np.zeros(len(test_x)), None
            else:
                k = min(folds, pos, neg)
                if k < 2:
                    cost = sorted(costs)[len(costs) // 2]
                else:
                    split = list(StratifiedKFold(n_splits=k).split(train_x, y))
                    cv = [np.mean([average_precision_score(y[va], svm(cost).fit(train_x[tr], y[tr])
                                                           .decision_function(train_x[va]), pos_label=1)
                                   for tr, va in split]) for cost in costs]
                    cost = costs[int(np.argmax(cv))]
                scores = svm(cost).fit(train_x, y).decision_function(test_x)
            aps.append(ranking_ap(scores, test_y[:, c]))
            chosen.append(None if cost is None else float(cost))
    return aps, chosen


@gin.configurable(module="voc")
class VOC07SVM:
    """VOC07 image classification: per-class linear SVMs on frozen features (Goyal et al. 2019).

    Reports ``svm/voc07/mAP`` (percent, over classes with test positives) and, with
    ``per_class``, ``svm/voc07/AP/<class>``; the chosen costs and per-class APs are kept
    in ``self.selected`` (recorded in run.json).
    """

    name = "svm/voc07"
    frozen = False

    def __init__(self, root: str | None = None, generate_embedded: bool = False, image_size: int = 224,
                 costs: Sequence[float] = GOYAL_COSTS, folds: int = 3, positive_weight: float = 2.0,
                 max_iter: int = 2000, normalize: bool = True, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, per_class: bool = False, batch_size: int = 256) -> None:
        """Args:
            root: the folder holding ``VOCdevkit/VOC2007`` (real VOC or ``python -m harness.vocgen DIR``).
            generate_embedded: without ``root``, generate the Fashion-MNIST tree (`EmbeddedVOC`) under
                the results folder.
            image_size: side every image is resized to (whole, no crop).
            costs: SVM cost grid (default: Goyal et al.'s 10^-7..10^2 and 2^-19..2^-4).
            folds: cross-validation folds on trainval.
            positive_weight: class weight of positives.
            max_iter: liblinear's iteration cap.
            normalize: L2-normalise each feature vector.
            mean: pixel mean for normalisation (default: the pretraining data's).
            std: pixel std (default: the pretraining data's).
            per_class: also report each class's AP as a metric.
            batch_size: extraction batch size.
        """
        if image_size < 8 or not costs or min(costs) <= 0 or folds < 2 or positive_weight <= 0:
            raise ValueError(f"voc.VOC07SVM needs image_size >= 8, costs > 0, folds >= 2, positive_weight > 0 (check "
                             f"its gin bindings); got {image_size}, {costs}, {folds}, {positive_weight}")
        self.root, self.generate_embedded, self.image_size = root, generate_embedded, int(image_size)
        self.costs, self.folds, self.positive_weight = [float(c) for c in costs], int(folds), float(positive_weight)
        self.max_iter, self.normalize, self.per_class, self.batch_size = int(max_iter), normalize, per_class, batch_size
        self.mean, self.std = (tuple(mean) if mean else None), (tuple(std) if std else None)
        self.selected: dict = {}

    def params(self) -> dict:
        """Settings that change the numbers (JSON-serialisable)."""
        out = {"root": self.root, "image_size": self.image_size, "costs": self.costs, "folds": self.folds,
               "positive_weight": self.positive_weight, "max_iter": self.max_iter, "normalize": self.normalize,
               "mean": self.mean, "std": self.std, "ap": "voc07-11point"}
        if not self.root and self.generate_embedded:
            out["embedded"] = EmbeddedVOC().params()
        return out

    def features(self, ctx: Context, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Frozen features ``[N, D]`` and labels ``[N, C]`` of a split, cached beside the encoder."""
        classes = voc_classes(root)
        ids, labels = image_labels(root, split, classes)
        encoder = backbone.fit_input_size(ctx.encoder(), self.image_size)  # a ViT built for the pretraining size
        channels = in_channels(encoder, default=len(ctx.dataset.split("train").mean))
        mean, std = pixel_stats(ctx, channels, self.mean, self.std)
        listing = (voc_dir(root) / "ImageSets" / "Main" / f"{split}.txt").stat()
        key = ginutil.digest([json.dumps([str(root.resolve()), split, self.image_size, channels, mean, std,
                                          listing.st_size, listing.st_mtime_ns])])
        path = Path(ctx.pretrain_dir) / "features" / f"voc07-{key}.pt"
        if (hit := store.load_cache(path)) is not None:
            return hit[0]["x"].numpy(), labels
        paths = [voc_dir(root) / "JPEGImages" / f"{i}.jpg" for i in ids]
        data = ImageSet(images=ResizedImages(paths, self.image_size, channels), labels=torch.arange(len(ids)),
                        classes=list(classes), mean=mean, std=std)
        feats: Features = extract(encoder, data, self.image_size, self.batch_size, ctx.device, f"voc07/{split}",
                                  ctx.progress)
        store.save_cache(path, {"x": feats.x})
        return feats.x.numpy(), labels

    def evaluate(self, ctx: Context) -> dict[str, float]:
        """Extracts (or reads) trainval and test features, fits the SVMs, scores test."""
        root = resolve_root(self.root, self.generate_embedded, ctx, "voc.VOC07SVM")
        classes = voc_classes(root)
        (train_x, train_y), (test_x, test_y) = (self.features(ctx, root, s) for s in ("trainval", "test"))
        train_x, test_x = train_x.astype(np.float64), test_x.astype(np.float64)
        if self.normalize:
            train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
        aps, costs = svm_voc07(train_x, train_y, test_x, test_y, self.costs, self.folds, self.positive_weight,
                               self.max_iter)
        scored = [a for a in aps if not math.isnan(a)]
        if not scored:
            raise DataError(f"{voc_dir(root)}: no test image has a (non-difficult) object; cannot compute an AP")
        out = {"svm/voc07/mAP": 100.0 * float(np.mean(scored))}
        if self.per_class:
            out.update({f"svm/voc07/AP/{c}": 100.0 * a for c, a in zip(classes, aps) if not math.isnan(a)})
        self.selected = {"cost": dict(zip(classes, costs)),
                         "AP": {c: (None if math.isnan(a) else round(100.0 * a, 2)) for c, a in zip(classes, aps)},
                         "root": str(root)}
        return out
