"""Weighted k-nearest-neighbour classifier on frozen features.

Follows the kNN monitor of NPID: Wu et al. 2018, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination" (CVPR): features are L2-normalised,
the k train items of largest cosine similarity vote for their class, each with weight
``exp(sim / temperature)``; the class with the largest summed weight is the prediction.

Ties are broken deterministically: among train items equally similar to a test item
the lower train index is taken first, and among classes with equal summed weight the
lower class id wins.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

import gin
from harness.evals import Features


def _votes(
    sim: torch.Tensor,
    vals: torch.Tensor,
    idx: torch.Tensor,
    y: torch.Tensor,
    k: int,
    num_classes: int,
    temperature: float,
) -> torch.Tensor:
    """Summed neighbour weights per class for one chunk of test rows.

    Args:
        sim: cosine similarities to all train items, ``[B, N]``.
        vals: the largest similarities per row, sorted, ``[B, K]`` with ``K > k`` unless ``k == N``.
        idx: train indices of ``vals`` (in any order among equal values), ``[B, K]``.
        y: train labels ``[N]``.
        k: number of neighbours, at most N.
        num_classes: width of the vote table.
        temperature: NPID's tau.

    Returns:
        Votes ``[B, C]`` in float64.
    """
    # exp((s - 1) / tau) is exp(s / tau) times a constant: same argmax, no overflow.
    weight = lambda s: torch.exp((s.double() - 1.0) / temperature)  # noqa: E731
    votes = torch.zeros(len(sim), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, y[idx[:, :k]], weight(vals[:, :k]))  # [B, C]
    if k == vals.shape[1]:  # k == N: every train item votes, no choice among ties
        return votes
    kth = vals[:, k - 1 : k]  # [B, 1] the smallest similarity that made the cut
    rows = (vals[:, k] == kth[:, 0]).nonzero().squeeze(1)  # [R] the cut splits a tie: topk chose arbitrarily
    if len(rows):  # redo them: neighbours above the cut, then the lowest-index tied items
        above = vals[rows, :k] > kth[rows]  # [R, k]
        fixed = torch.zeros(len(rows), num_classes, dtype=torch.float64)
        fixed.scatter_add_(1, y[idx[rows, :k]], weight(vals[rows, :k]) * above)
        tied = sim[rows] == kth[rows]  # [R, N]
        rank = tied.to(torch.int32).cumsum(1, dtype=torch.int32)  # [R, N]
        r, j = (tied & (rank <= k - above.sum(1, keepdim=True))).nonzero(as_tuple=True)
        counts = torch.zeros_like(fixed).index_put_((r, y[j]), torch.ones(len(r), dtype=fixed.dtype), accumulate=True)
        votes[rows] = fixed + counts * weight(kth[rows])
    return votes


@gin.configurable(module="knn")
class KNN:
    """NPID weighted kNN on frozen features; reports top-1 accuracy in percent per k."""

    name = "knn/npid"

    def __init__(self, ks: Sequence[int] = (20, 200), temperature: float = 0.07, chunk_size: int = 1024) -> None:
        """Args:
        ks: neighbour counts to report; each is clipped to the number of train items,
            the key keeps the requested value (``knn/top1@200``).
        temperature: tau of the vote weight ``exp(sim / tau)`` (NPID uses 0.07).
        chunk_size: test rows per similarity block; peak memory is about
            ``chunk_size * N_train * 4`` bytes, up to 3x that where many items tie.
        """
        if not ks or min(ks) < 1 or temperature <= 0 or chunk_size < 1:
            raise ValueError(
                f"knn.KNN needs ks >= 1, temperature > 0 and chunk_size >= 1 (check the gin bindings "
                f"of knn.KNN); got ks={ks}, temperature={temperature}, chunk_size={chunk_size}"
            )
        self.ks = sorted({int(k) for k in ks})
        self.temperature = float(temperature)
        self.chunk_size = int(chunk_size)

    def params(self) -> dict:
        """Settings that change the numbers (JSON-serialisable)."""
        return {"ks": list(self.ks), "temperature": self.temperature}

    @torch.no_grad()
    def __call__(self, train: Features, test: Features) -> dict[str, float]:
        """Classifies every test item by its train neighbours.

        Returns:
            ``{"knn/top1@<k>": accuracy in percent}`` for each k.
        """
        bank = F.normalize(train.x.float(), dim=1)  # [N, D]
        query = F.normalize(test.x.float(), dim=1)  # [M, D]
        num_classes = train.num_classes
        k_top = min(self.ks[-1] + 1, len(bank))  # one past the largest k, to see ties at the cut
        correct = dict.fromkeys(self.ks, 0)
        for start in range(0, len(query), self.chunk_size):
            sim = query[start : start + self.chunk_size] @ bank.T  # [B, N]
            vals, idx = sim.topk(k_top, dim=1)  # [B, K]
            target = test.y[start : start + self.chunk_size]  # [B]
            for k in self.ks:
                votes = _votes(sim, vals, idx, train.y, min(k, len(bank)), num_classes, self.temperature)
                correct[k] += int((votes.argmax(1) == target).sum())  # argmax: first max wins
            del sim, vals, idx  # free this block before the next one is made
        return {f"knn/top1@{k}": 100.0 * correct[k] / len(query) for k in self.ks}
