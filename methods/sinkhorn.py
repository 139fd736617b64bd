"""Sinkhorn-Knopp: equipartitioned assignments of samples to clusters.

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

import torch


def sinkhorn_scalings(
    logits: torch.Tensor, iterations: int, tolerance: float = 0.0, check_every: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log row and column scalings of ``exp(logits)`` towards uniform marginals.

    Each iteration first rescales the columns to sum to ``1/K``, then the rows to ``1/N``
    (SwAV's order; SeLa's ``r`` then ``c``), so the rows of the plan sum exactly to ``1/N``.
    The scalings are iterated as vectors against a fixed kernel (two matrix-vector products
    per iteration, as in SeLa's code), in float64; each row of the kernel is shifted by its
    maximum and exponents are clamped at -700, so nothing overflows or vanishes entirely.

    Args:
        logits: ``[N, K]`` log of the unnormalised plan (SwAV: scores / epsilon; SeLa:
            lambda * log-probabilities).
        iterations: at most this many iterations.
        tolerance: stop once ``sum_i |c_i / c_i' - 1|`` (SeLa's test on the row scaling)
            falls below it; 0 runs all `iterations`.
        check_every: test the tolerance every this many iterations (SeLa: 10).
    Returns:
        ``(u [N], v [K])``: the plan is ``exp(logits + u[:, None] + v[None])``.
    """
    x = logits.double()  # [N, K]
    n, k = x.shape
    shift = x.max(1).values  # [N]
    kernel = torch.exp((x - shift[:, None]).clamp_min(-700.0))  # [N, K], row maxima 1
    c = torch.exp((shift - shift.max()).clamp_min(-700.0)) / n  # [N]: c * kernel is exp(x) up to a constant
    r = torch.ones(k, dtype=x.dtype, device=x.device)  # [K]
    for it in range(iterations):
        r = (1 / k) / (c @ kernel)  # columns sum to 1/K
        c_new = (1 / n) / (kernel @ r)  # rows sum to 1/N
        done = tolerance > 0 and it % check_every == 0 and float((c / c_new - 1).abs().sum()) < tolerance
        c = c_new
        if done:
            break
    return c.log() - shift, r.log()


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
