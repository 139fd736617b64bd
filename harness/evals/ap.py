"""Average precision as PASCAL VOC 2007 computes it: the devkit's 11-point interpolated AP,
the precision-recall curve it is taken over, and the classification AP of one class."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def voc07_ap(recall: ArrayLike, precision: ArrayLike) -> float:
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


def ranking_ap(scores: ArrayLike, labels: ArrayLike) -> float:
    """VOC07 classification AP of one class: labels 1 (present), -1 (absent), 0 (difficult,
    ignored as in the devkit's ``VOCevalcls``). NaN when no image is positive."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels)
    keep = y != 0
    s, y = s[keep], y[keep]
    if not (y > 0).any():
        return math.nan
    return voc07_ap(*pr_curve(s, (y > 0).astype(np.float64), (y < 0).astype(np.float64), int((y > 0).sum())))
