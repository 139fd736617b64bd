"""Loss maths against values computed independently of the implementation."""

import math

import torch

from methods.rotnet import rotate_all
from methods.simclr import nt_xent


def _nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR eq. 1 written as loops over python floats."""
    z = [[c / math.sqrt(sum(c * c for c in v)) for c in v] for v in (z1.tolist() + z2.tolist())]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = [sum(a * b for a, b in zip(z[i], z[k])) / tau for k in range(2 * n)]
        denom = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[j]) / denom)
    return total / (2 * n)


def test_nt_xent_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    for tau in (0.1, 0.5, 1.0):
        assert math.isclose(nt_xent(z1, z2, tau).item(), _nt_xent_by_hand(z1, z2, tau), rel_tol=1e-5)


def test_nt_xent_closed_form_for_orthogonal_pairs():
    # Two identical pairs, orthogonal to each other: each view's partner has sim 1, the
    # two others sim 0, so loss = -log(e^(1/t) / (e^(1/t) + 2)).
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2))
    assert math.isclose(nt_xent(z1, z1.clone(), tau).item(), expected, rel_tol=1e-6)


def test_rotate_all_labels_and_pixels():
    x = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    rotated, labels = rotate_all(x)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # 90 degrees counter-clockwise of [[0, 1], [2, 3]] is [[1, 3], [0, 2]].
    assert rotated[2, 0].tolist() == [[1.0, 3.0], [0.0, 2.0]]
    assert torch.equal(rotated[4], torch.flip(x[0], dims=(1, 2)))
