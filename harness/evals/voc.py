"""PASCAL VOC 2007 classification with linear SVMs on frozen features.

The AP maths live in `harness.evals.ap` and the VOC reading (devkit lists, resized images,
the embedded tree) in `harness.evals.voc_data`; their names are re-exported here.

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
from typing import TYPE_CHECKING, Any, Sequence, cast

import numpy as np
import torch

import gin
from harness import backbone, ginutil, store
from harness.data import DataError, ImageSet
from harness.evals import Context, Features
from harness.evals.ap import pr_curve, ranking_ap, voc07_ap  # noqa: F401 - re-exported
from harness.evals.features import extract
from harness.evals.voc_data import (  # noqa: F401 - re-exported
    GENERATE_HINT,
    EmbeddedVOC,
    ResizedImages,
    image_labels,
    in_channels,
    pixel_stats,
    resolve_root,
    voc_classes,
    voc_dir,
)

if TYPE_CHECKING:
    from harness.data.files import ImageFiles

GOYAL_COSTS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, *(0.5**k for k in range(4, 20)))


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


def svm_voc07(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    costs: Sequence[float] = GOYAL_COSTS,
    folds: int = 3,
    positive_weight: float = 2.0,
    max_iter: int = 2000,
) -> tuple[list[float], list[float | None]]:
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
        return LinearSVC(
            C=cost,
            class_weight={1: positive_weight, -1: 1},
            loss="squared_hinge",
            penalty="l2",
            dual=True,
            tol=1e-4,
            max_iter=max_iter,
            intercept_scaling=1.0,
            random_state=0,
        )

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
                    cv = [
                        np.mean(
                            [
                                average_precision_score(
                                    y[va], svm(cost).fit(train_x[tr], y[tr]).decision_function(train_x[va]), pos_label=1
                                )
                                for tr, va in split
                            ]
                        )
                        for cost in costs
                    ]
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

    def __init__(
        self,
        root: str | None = None,
        generate_embedded: bool = False,
        image_size: int = 224,
        costs: Sequence[float] = GOYAL_COSTS,
        folds: int = 3,
        positive_weight: float = 2.0,
        max_iter: int = 2000,
        normalize: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        per_class: bool = False,
        batch_size: int = 256,
    ) -> None:
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
            raise ValueError(
                f"voc.VOC07SVM needs image_size >= 8, costs > 0, folds >= 2, positive_weight > 0 (check "
                f"its gin bindings); got {image_size}, {costs}, {folds}, {positive_weight}"
            )
        self.root, self.generate_embedded, self.image_size = root, generate_embedded, int(image_size)
        self.costs, self.folds, self.positive_weight = [float(c) for c in costs], int(folds), float(positive_weight)
        self.max_iter, self.normalize, self.per_class, self.batch_size = int(max_iter), normalize, per_class, batch_size
        self.mean, self.std = (tuple(mean) if mean else None), (tuple(std) if std else None)
        self.selected: dict = {}

    def params(self) -> dict:
        """Settings that change the numbers (JSON-serialisable)."""
        out: dict[str, Any] = {
            "root": self.root,
            "image_size": self.image_size,
            "costs": self.costs,
            "folds": self.folds,
            "positive_weight": self.positive_weight,
            "max_iter": self.max_iter,
            "normalize": self.normalize,
            "mean": self.mean,
            "std": self.std,
            "ap": "voc07-11point",
        }
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
        key = ginutil.digest(
            [
                json.dumps(
                    [
                        str(root.resolve()),
                        split,
                        self.image_size,
                        channels,
                        mean,
                        std,
                        listing.st_size,
                        listing.st_mtime_ns,
                    ]
                )
            ]
        )
        path = Path(ctx.pretrain_dir) / "features" / f"voc07-{key}.pt"
        if (hit := store.load_cache(path)) is not None:
            return hit[0]["x"].numpy(), labels
        paths = [voc_dir(root) / "JPEGImages" / f"{i}.jpg" for i in ids]
        images = cast("ImageFiles", ResizedImages(paths, self.image_size, channels))  # `extract` only slices it
        data = ImageSet(images=images, labels=torch.arange(len(ids)), classes=list(classes), mean=mean, std=std)
        feats: Features = extract(
            encoder, data, self.image_size, self.batch_size, ctx.device, f"voc07/{split}", ctx.progress
        )
        store.save_cache(path, {"x": feats.x})
        return feats.x.numpy(), labels

    def check(self) -> None:
        """Preflight (before pretraining): a bound root holds VOCdevkit/VOC2007, or the tree is generated."""
        if self.root or not self.generate_embedded:
            resolve_root(self.root, self.generate_embedded, cast(Context, None), "voc.VOC07SVM")

    def evaluate(self, ctx: Context) -> dict[str, float]:
        """Extracts (or reads) trainval and test features, fits the SVMs, scores test."""
        root = resolve_root(self.root, self.generate_embedded, ctx, "voc.VOC07SVM")
        classes = voc_classes(root)
        (train_x, train_y), (test_x, test_y) = (self.features(ctx, root, s) for s in ("trainval", "test"))
        train_x, test_x = train_x.astype(np.float64), test_x.astype(np.float64)
        if self.normalize:
            train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
        aps, costs = svm_voc07(
            train_x, train_y, test_x, test_y, self.costs, self.folds, self.positive_weight, self.max_iter
        )
        scored = [a for a in aps if not math.isnan(a)]
        if not scored:
            raise DataError(f"{voc_dir(root)}: no test image has a (non-difficult) object; cannot compute an AP")
        out = {"svm/voc07/mAP": 100.0 * float(np.mean(scored))}
        if self.per_class:
            out.update({f"svm/voc07/AP/{c}": 100.0 * a for c, a in zip(classes, aps) if not math.isnan(a)})
        self.selected = {
            "cost": dict(zip(classes, costs)),
            "AP": {c: (None if math.isnan(a) else round(100.0 * a, 2)) for c, a in zip(classes, aps)},
            "root": str(root),
        }
        return out
