"""Low-shot classification on frozen features: k labelled examples per class.

For each k, several class-balanced draws of k training items per class (seeded, nested:
draw d at k = 5 holds draw d at k = 1); on each, `harness.evals.linear`'s L2-regularised
multinomial logistic regression with one fixed strength (with one or a few examples per
class there is nothing to hold out to choose it); top-1 on the test features, mean and
standard deviation over the draws. The protocol of the low-shot benchmarks of Goyal et al.
2019 ("Scaling and Benchmarking Self-Supervised Visual Representation Learning", ICCV),
with logistic regression in place of their linear SVMs.

Features are standardised with the statistics of all training features (their labels
unused), as the fast linear probe standardises; statistics of the k x C labelled items
alone amplify dimensions that happen to vary little among them (Fashion-MNIST pixels, k = 1,
three draws: 30 % top-1 with them against 37 % with the training set's).
"""

from __future__ import annotations

import statistics
from typing import Sequence

import torch
import torch.nn.functional as F

import gin
from harness.evals import Features
from harness.evals.linear import fit_logistic, one_thread, standardizer
from harness.evals.subsets import balanced_indices


@gin.configurable(module="lowshot")
class LowShot:
    """Logistic regression on k examples per class, mean ± std over seeded draws.

    Args:
        name: the protocol's name and the prefix of its metrics.
        ks: examples per class.
        draws: seeded draws per k (draw d uses seed ``seed + d``).
        seed: seed of the first draw.
        l2: L2 strength, in `linear.LinearProbe`'s units (``mean CE + l2 * ||W||^2`` on
            standardised features); on an embedded MoCo encoder's features top-1 moved by
            under a point between 1e-3 and 1e-2 and fell by up to 4 points at 1e-1.
        max_iter: L-BFGS iterations per fit.
    """

    def __init__(
        self,
        name: str = "lowshot/logreg",
        ks: Sequence[int] = (1, 5, 10),
        draws: int = 5,
        seed: int = 0,
        l2: float = 1e-2,
        max_iter: int = 50,
    ) -> None:
        if not ks or min(ks) < 1 or draws < 1 or l2 < 0 or max_iter < 1:
            raise ValueError(
                f"lowshot.LowShot needs ks >= 1, draws >= 1, l2 >= 0 and max_iter >= 1 (check its gin "
                f"bindings); got ks={list(ks)}, draws={draws}, l2={l2}, max_iter={max_iter}"
            )
        self.name, self.ks, self.draws, self.seed = str(name), sorted({int(k) for k in ks}), int(draws), int(seed)
        self.l2, self.max_iter = float(l2), int(max_iter)

    def params(self) -> dict:
        """Settings that change the numbers (JSON-serialisable)."""
        return {
            "ks": self.ks,
            "draws": self.draws,
            "seed": self.seed,
            "l2": self.l2,
            "max_iter": self.max_iter,
            "standardize": "all training features",
        }

    @torch.no_grad()
    def __call__(self, train: Features, test: Features) -> dict[str, float]:
        """Returns ``<name>/k<k>/top1`` (mean over draws, %) and ``<name>/k<k>/top1_std``
        (sample standard deviation over draws; 0 for one draw)."""
        counts = torch.bincount(train.y)
        fewest = int(counts[counts > 0].min())
        if fewest < self.ks[-1]:
            rare = int((counts == fewest).nonzero()[0])
            raise ValueError(
                f"{self.name}: class {rare} has {fewest} training items, fewer than k = {self.ks[-1]}; "
                "lower lowshot.LowShot.ks or use more training features "
                "(features.FrozenFeatures.train_size)"
            )
        out = {}
        with one_thread():
            scale = standardizer(train.x)
            xtr, xte = scale(train.x), scale(test.x)  # [N, D], [M, D]
            for k in self.ks:
                accs = []
                for d in range(self.draws):
                    idx = balanced_indices(train.y, k, self.seed + d)  # [k * C]
                    w, b = fit_logistic(xtr[idx], train.y[idx], train.num_classes, self.l2, self.max_iter)
                    accs.append(100.0 * int((F.linear(xte, w, b).argmax(1) == test.y).sum()) / len(test.y))
                out[f"{self.name}/k{k}/top1"] = statistics.fmean(accs)
                out[f"{self.name}/k{k}/top1_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
        return out
