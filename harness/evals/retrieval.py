"""Nearest-neighbour retrieval on frozen features.

Each test item queries the training items (the gallery) by cosine similarity; an item is
relevant when it shares the query's class. Recall@k (the share of queries with at least one
relevant item among their k nearest, as in deep metric learning, e.g. Song et al. 2016,
"Deep Metric Learning via Lifted Structured Feature Embedding", CVPR) and mean average
precision over the full ranking. Equal similarities rank the lower gallery index first.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

import gin
from harness.evals import Features


@gin.configurable(module="retrieval")
class Retrieval:
    """Cosine-similarity retrieval of training items by test queries; recall@k and mAP.

    Args:
        name: the protocol's name and the prefix of its metrics.
        ks: cut-offs of recall@k (each clipped to the gallery size).
        chunk_size: queries ranked at once; peak memory about ``chunk_size * N_gallery * 30`` bytes.
    """

    def __init__(self, name: str = "retrieval/cosine", ks: Sequence[int] = (1, 5, 10), chunk_size: int = 256) -> None:
        if not ks or min(ks) < 1 or chunk_size < 1:
            raise ValueError(
                f"retrieval.Retrieval needs ks >= 1 and chunk_size >= 1 (check its gin bindings); got "
                f"ks={list(ks)}, chunk_size={chunk_size}"
            )
        self.name, self.ks, self.chunk_size = str(name), sorted({int(k) for k in ks}), int(chunk_size)

    def params(self) -> dict:
        """Settings that change the numbers (JSON-serialisable)."""
        return {"ks": self.ks, "similarity": "cosine", "relevance": "same class"}

    @torch.no_grad()
    def __call__(self, train: Features, test: Features) -> dict[str, float]:
        """Returns ``<name>/R@<k>`` and ``<name>/mAP`` in percent; queries without any relevant
        gallery item count as misses for recall and are left out of the mAP."""
        gallery = F.normalize(train.x.float(), dim=1)  # [N, D]
        queries = F.normalize(test.x.float(), dim=1)  # [M, D]
        n = len(gallery)
        ranks = torch.arange(1, n + 1, dtype=torch.float64)  # [N]
        found = dict.fromkeys(self.ks, 0)
        ap_sum, with_relevant = 0.0, 0
        for start in range(0, len(queries), self.chunk_size):
            sim = queries[start : start + self.chunk_size] @ gallery.T  # [B, N]
            order = sim.sort(dim=1, descending=True, stable=True).indices  # [B, N] ties: lower index first
            rel = train.y[order] == test.y[start : start + self.chunk_size, None]  # [B, N]
            for k in self.ks:
                found[k] += int(rel[:, : min(k, n)].any(1).sum())
            hits = rel.sum(1)  # [B]
            precision = rel.cumsum(1, dtype=torch.float64) / ranks  # [B, N] precision at each rank
            ap = (precision * rel).sum(1) / hits.clamp_min(1)  # [B]
            ap_sum += float(ap[hits > 0].sum())
            with_relevant += int((hits > 0).sum())
            del sim, order, rel, precision
        out = {f"{self.name}/R@{k}": 100.0 * found[k] / len(queries) for k in self.ks}
        out[f"{self.name}/mAP"] = 100.0 * ap_sum / max(1, with_relevant)
        return out
