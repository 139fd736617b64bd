"""Linear probes: the fast one on cached frozen features, and the papers' SGD probe.

`LinearProbe` (``linear/fast``) is the L-BFGS logistic-regression probe of Kornblith et al.
2019 ("Do Better ImageNet Models Transfer Better?"), also used for SimCLR's transfer results
(Chen et al. 2020): an L2-regularised multinomial logistic regression on frozen features
without augmentation, its L2 strength chosen on a stratified hold-out of the training set
(never the test set), then refitted on the whole training set.

`PaperProbe` (``linear/mocov2``, ``linear/goyal19``, ``linear/mae``; gin/protocols/) is the
linear evaluation most self-supervised papers report: a linear classifier (optionally after a
BatchNorm) trained by SGD or LARS on the frozen encoder's features of randomly cropped and
flipped training images, with the paper's schedule and epochs; top-1/top-5 of the last
epoch on centre crops of the test images. It needs the encoder, not cached features.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness.evals import Features, finetune

if TYPE_CHECKING:
    from harness.data import ImageSet
    from harness.evals import Context

# Preconditioner's curvature per unit feature variance (Boehning's bound is 1/2; real fits sit
# lower) and L-BFGS tolerances. With them and max_iter=50, probes on Fashion-MNIST features
# (1k-10k items) score within 0.1 points of fully converged fits and choose the same l2.
KAPPA, TOL_GRAD, TOL_CHANGE = 0.3, 1e-5, 1e-7
Pair = tuple[torch.Tensor, torch.Tensor]


def _fit(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int, basis: Pair, init: Pair | None
) -> Pair:
    """Minimises ``mean cross-entropy + l2 * ||W||_F^2`` (bias unpenalised) by L-BFGS on
    ``W = V diag(s) U^T``, ``U diag(lam) U^T`` being the feature covariance (``basis``) and
    ``s = (KAPPA lam + 2 l2)^-1/2``: the optimum is unchanged, the curvature evened out.

    Returns:
        Weight ``[C, D]`` and bias ``[C]``, starting from ``init`` (same shapes) or zeros.
    """
    lam, u = basis
    s = (KAPPA * lam + 2 * l2).clamp_min(1e-6).rsqrt()  # [D]
    w0, b0 = init if init is not None else (torch.zeros(num_classes, x.shape[1]), torch.zeros(num_classes))
    v, b = ((w0 @ u) / s).requires_grad_(True), b0.clone().requires_grad_(True)  # [C, D], [C]
    opt = torch.optim.LBFGS(
        [v, b], max_iter=max_iter, tolerance_grad=TOL_GRAD, tolerance_change=TOL_CHANGE, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, (v * s) @ u.T, b), y) + l2 * (v * s).square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return ((v * s) @ u.T).detach(), b.detach()


def curvature_basis(x: torch.Tensor) -> Pair:
    """Eigenvalues ``[D]`` and eigenvectors ``[D, D]`` of ``x^T x / N``: `_fit`'s preconditioner."""
    lam, u = torch.linalg.eigh((x.T @ x).double() / len(x))  # [D], [D, D]
    return lam.clamp_min(0).float(), u.float()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 50) -> Pair:
    """L2-regularised multinomial logistic regression on `x` as given (no standardisation).

    Returns:
        Weight ``[C, D]`` and bias ``[C]``.
    """
    return _fit(x, y, num_classes, l2, max_iter, curvature_basis(x), None)


def standardizer(reference: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps features to zero mean and unit variance per dimension, by the statistics of
    `reference` ``[N, D]`` (dimensions constant there are only centred)."""
    x64 = reference.double()
    mean, std = x64.mean(0), x64.std(0)  # [D]
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant dims: no division by ~0
    return lambda x: ((x.double() - mean) / std).float()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Runs the block on one torch thread: L-BFGS's many small ops gain little from more,
    slow down 10x or more when parallel jobs share the cores, and one thread gives the same
    numbers everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _split(y: torch.Tensor, val_fraction: float, seed: int) -> torch.Tensor:
    """Returns a stratified seeded validation mask ``[N]``: ``val_fraction`` of each class
    (each keeps at least one training item)."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))  # [N]
    val = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():
        members = perm[y[perm] == c]
        val[members[: min(round(val_fraction * len(members)), len(members) - 1)]] = True
    return val


@gin.configurable(module="linear")
class LinearProbe:
    """L2-regularised multinomial logistic regression on standardised frozen features."""

    name = "linear/fast"

    def __init__(
        self,
        l2_grid: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
        val_fraction: float = 0.2,
        max_iter: int = 50,
        seed: int = 0,
    ) -> None:
        """Args:
        l2_grid: candidate L2 strengths. Units: the coefficient of the squared Frobenius norm
            of the weight in ``mean_i CE_i + l2 * ||W||^2`` (mean over samples, bias not
            penalised) on features standardised to unit variance; scikit-learn's ``C`` is
            ``1 / (2 * l2 * N_fit)``. The default brackets the optima measured on Fashion-MNIST
            pixel and random-conv features with 600 to 60k train items (1e-5 to 1e-1).
        val_fraction: share of each training class held out to choose ``l2``.
        max_iter: cap on L-BFGS iterations per fit (100: twice the time, top-1 within 0.1).
        seed: seed of the stratified hold-out split.
        """
        if not l2_grid or min(l2_grid) < 0 or not 0 < val_fraction < 1 or max_iter < 1:
            raise ValueError(
                f"linear.LinearProbe needs l2_grid values >= 0, 0 < val_fraction < 1, max_iter >= 1 "
                f"(check its gin bindings); got {l2_grid}, {val_fraction}, {max_iter}"
            )
        self.l2_grid = sorted(float(v) for v in l2_grid)
        self.val_fraction, self.max_iter, self.seed = float(val_fraction), int(max_iter), int(seed)

    def params(self) -> dict:
        """Settings that change the numbers (JSON-serialisable)."""
        return {
            "l2_grid": list(self.l2_grid),
            "val_fraction": self.val_fraction,
            "max_iter": self.max_iter,
            "seed": self.seed,
        }

    @torch.no_grad()
    def __call__(self, train: Features, test: Features) -> dict[str, float]:
        """Chooses ``l2`` on held-out train items, refits on all of train, scores test.

        Runs on one thread (`one_thread`).

        Returns:
            ``linear/top1``, ``linear/top5`` (only with more than 5 train classes), in percent.
            The chosen strength is left in ``self.selected = {"l2": ...}`` (recorded in run.json).
        """
        with one_thread():
            scale = standardizer(train.x)
            xtr, xte = scale(train.x), scale(test.x)  # [N, D], [M, D]
            num_classes = train.num_classes  # the probe's width never depends on test labels
            basis = curvature_basis(xtr)
            best, fit, chosen, best_hits = self.l2_grid[-1], None, None, -1
            val = _split(train.y, self.val_fraction, self.seed)  # [N]
            if len(self.l2_grid) > 1 and not val.any():
                raise ValueError(
                    "linear.LinearProbe: no held-out train items to choose l2 from; raise "
                    "linear.LinearProbe.val_fraction or bind a one-value l2_grid"
                )
            for l2 in reversed(self.l2_grid if len(self.l2_grid) > 1 else []):  # strongest first; warm starts
                fit = _fit(xtr[~val], train.y[~val], num_classes, l2, self.max_iter, basis, fit)
                hits = int((F.linear(xtr[val], *fit).argmax(1) == train.y[val]).sum())
                if hits > best_hits:  # equal scores keep the stronger l2
                    best, best_hits, chosen = l2, hits, fit
            w, b = _fit(xtr, train.y, num_classes, best, self.max_iter, basis, chosen)  # [C, D], [C]
        hit = F.linear(xte, w, b).topk(min(5, num_classes), dim=1).indices == test.y[:, None]  # [M, 5]
        out = {"linear/top1": 100.0 * int(hit[:, 0].sum()) / len(hit)}
        if num_classes > 5:
            out["linear/top5"] = 100.0 * int(hit.any(1).sum()) / len(hit)
        self.selected = {"l2": best}
        return out


NORMS = finetune.HEAD_NORMS


@gin.configurable(module="linear")
class PaperProbe:
    """A linear classifier trained by SGD/LARS on augmented views of a frozen encoder.

    Defaults are MoCo's (He et al. 2020, "Momentum Contrast for Unsupervised Visual
    Representation Learning", CVPR, sec. 4.1; kept by MoCo v2): SGD, lr 30, momentum 0.9,
    no weight decay, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80. The named recipes
    are gin files under gin/protocols/ (docs/protocols.md lists them and their sources).

    Args:
        name: the protocol's name, also the prefix of its metrics (``<name>/top1``).
        image_size: side of the training crops and of the evaluation view (``%IMAGE_SIZE``).
        epochs, batch_size, lr, scale_lr, optimizer, momentum, nesterov, weight_decay, schedule,
            milestones, warmup_epochs, crop_scale, max_steps, precise_bn, augment: the training recipe
            (`harness.evals.finetune.Recipe`; ``lr`` is at batch 256 when ``scale_lr``; ``augment='flip'``
            trains on cached features of each image and its mirror image instead of random crops).
        norm: before the classifier, ``none``, ``bn`` (BatchNorm with affine parameters, as
            VISSL's linear head of Goyal et al. 2019) or ``bn_noaffine`` (MAE).
        eval_crop: central fraction of each test image that is evaluated (ImageNet: 224/256).
        train_size: labelled training images (a fixed subset, the frozen features' one); None: all.
        test_size: test images (a fixed subset); None: all.
    """

    frozen = False

    def __init__(
        self,
        name: str = "linear/mocov2",
        image_size: int = gin.REQUIRED,
        epochs: float = 100,
        batch_size: int = 256,
        lr: float = 30.0,
        scale_lr: bool = True,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        schedule: str = "step",
        milestones: Sequence[float] = (60, 80),
        warmup_epochs: float = 0.0,
        crop_scale: Sequence[float] = (0.08, 1.0),
        norm: str = "none",
        eval_crop: float = 0.875,
        train_size: int | None = None,
        test_size: int | None = None,
        max_steps: int | None = None,
        precise_bn: bool = False,
        augment: str = "crop",
    ) -> None:
        if norm not in NORMS or not 0 < eval_crop <= 1 or not name:
            raise ValueError(
                f"linear.PaperProbe ({name}): norm must be one of {NORMS} and 0 < eval_crop <= 1 (check "
                f"its gin bindings); got norm={norm!r}, eval_crop={eval_crop}"
            )
        self.name, self.image_size, self.norm, self.eval_crop = str(name), int(image_size), norm, float(eval_crop)
        self.train_size, self.test_size = train_size, test_size
        self.recipe = finetune.recipe_of(locals())

    def params(self) -> dict:
        """Settings that change the numbers (JSON-serialisable)."""
        return {
            **self.recipe.params(),
            "image_size": self.image_size,
            "norm": self.norm,
            "eval_crop": self.eval_crop,
            "train_size": self.train_size,
            "test_size": self.test_size,
        }

    def head(self, dim: int, num_classes: int) -> nn.Module:
        """The classifier: weights ~ N(0, 0.01), zero bias, after the chosen normalisation."""
        return finetune.classifier(dim, num_classes, self.norm, std=0.01)

    def budget(self, train: ImageSet) -> dict[str, dict[str, int]]:
        """Batch, steps and images seen of the classifier's training on `train` (as `evaluate` runs)."""
        n = len(train) if self.train_size is None else min(self.train_size, len(train))
        return {"": self.recipe.budget(n)}

    def evaluate(self, ctx: Context) -> dict[str, float]:
        """Trains the classifier on the training split, scores the test split.

        Returns:
            ``<name>/top1`` and ``<name>/top5`` (with more than 5 classes), in percent, of the last epoch.
            ``self.selected["budget"]`` records the batch, steps and images seen.
        """
        train = ctx.dataset.split("train").subset(self.train_size)
        test = ctx.dataset.split("test").subset(self.test_size)
        encoder = ctx.encoder()
        head = self.head(finetune.feature_dim(encoder, train, self.image_size, ctx.device), len(train.classes))
        index = torch.arange(len(train))
        done = finetune.train(
            encoder,
            head,
            train,
            index,
            self.recipe,
            self.image_size,
            fine_tune=False,
            seed=ctx.seed,
            device=ctx.device,
            progress=ctx.progress,
            desc=self.name,
        )
        self.selected = {"budget": {k: done[k] for k in ("batch", "steps", "images_seen")}}
        if self.recipe.precise_bn:
            finetune.refresh_bn(
                encoder, head, train, index, self.image_size, self.eval_crop, fine_tune=False, device=ctx.device
            )
        scores = finetune.test(encoder, head, test, self.image_size, self.eval_crop, ctx.device)
        return {f"{self.name}/{k}": v for k, v in scores.items()}
