"""Sinkhorn-Knopp in the log domain: equipartitioned assignments of samples to clusters.

Shared by SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting
Cluster Assignments", NeurIPS: soft codes of a batch, 3 iterations at epsilon = 0.05) and
SeLa (Asano, Rupprecht & Vedaldi 2020, "Self-labelling via simultaneous clustering and
representation learning", ICLR: hard labels of the whole dataset, iterated to a tolerance).
Both solve the entropy-regularised transport problem of Cuturi 2013 ("Sinkhorn Distances",
NeurIPS): find ``Q = diag(exp(u)) exp(L) diag(exp(v))`` whose rows (samples) sum to ``1/N``
and columns (clusters) to ``1/K``, by alternately rescaling columns and rows.

This is not a method (no gin file); it holds no state.
"""
from __future__ import annotations

import math

import torch


def sinkhorn_scalings(logits: torch.Tensor, iterations: int, tolerance: float = 0.0,
                      check_every: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Log row and column scalings of ``exp(logits)`` towards uniform marginals.

    Each iteration first rescales the columns to sum to ``1/K``, then the rows to ``1/N``
    (SwAV's order; SeLa's ``r`` then ``c``), so the rows of the plan sum exactly to ``1/N``.
    Computed in float64.

    Args:
        logits: ``[N, K]`` log of the unnormalised plan (SwAV: scores / epsilon; SeLa:
            lambda * log-probabilities).
        iterations: at most this many iterations.
        tolerance: stop once ``sum_i |exp(u_i - u_i') - 1|`` (SeLa's ``|c / c_new - 1|``)
            falls below it; 0 runs all `iterations`.
        check_every: test the tolerance every this many iterations (SeLa: 10).
    Returns:
        ``(u [N], v [K])``: the plan is ``exp(logits + u[:, None] + v[None])``.
    """
    x = logits.double()  # [N, K]
    n, k = x.shape
    u = (-torch.logsumexp(x.flatten(), 0)).expand(n)  # [N]: total mass 1
    v = torch.zeros(k, dtype=x.dtype, device=x.device)
    for it in range(iterations):
        v = -math.log(k) - torch.logsumexp(x + u[:, None], dim=0)  # columns sum to 1/K
        u_new = -math.log(n) - torch.logsumexp(x + v[None], dim=1)  # rows sum to 1/N
        done = tolerance > 0 and it % check_every == 0 and float((torch.exp(u - u_new) - 1).abs().sum()) < tolerance
        u = u_new
        if done:
            break
    return u, v


def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The transport plan of `scores` at entropy weight `epsilon` (SwAV Algorithm 1).

    Args:
        scores: ``[N, K]`` sample-to-prototype similarities.
        epsilon: entropy regularisation (paper: 0.05).
        iterations: Sinkhorn-Knopp iterations (paper: 3).
    Returns:
        ``[N, K]`` plan in the dtype of `scores`: rows sum to ``1/N``, columns to about
        ``1/K``; multiply by ``N`` for per-sample codes.
    """
    logits = scores.double() / epsilon  # [N, K]
    u, v = sinkhorn_scalings(logits, iterations)
    return torch.exp(logits + u[:, None] + v[None]).to(scores.dtype)
