"""Frozen-feature evaluations: perfect features score ~100 %, constant ones chance, and a
hand-computed NPID vote."""

from __future__ import annotations

import json
import math

import pytest
import torch

import gin
from harness.evals import Features
from harness.evals.knn import KNN
from harness.evals.linear import LinearProbe


def separable(n: int, seed: int) -> Features:
    """One-hot class codes in 16 dims plus small noise, 10 balanced classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10  # [n]
    x = torch.nn.functional.one_hot(y, 16).float() + 0.05 * torch.randn(n, 16, generator=g)  # [n, 16]
    return Features(x, y)


def noisy(n: int, seed: int) -> Features:
    """Weak class signal in 64 dims: accuracy well below 100 %, so l2 matters."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    means = torch.randn(10, 64, generator=torch.Generator().manual_seed(123))  # [10, 64]
    return Features(0.3 * means[y] + torch.randn(n, 64, generator=g), y)


def test_separable_features_score_near_100() -> None:
    train, test = separable(300, 0), separable(200, 1)
    assert all(v >= 99.0 for v in KNN()(train, test).values())
    train.x[:, 12], test.x[:, 12] = 3.0, -1.0  # a dead unit, constant in train: no NaN, no harm
    out = LinearProbe()(train, test)
    assert out["linear/top1"] >= 99.0 and out["linear/top5"] >= 99.0


# Train labels 0..9 repeated, except that item 9 is class 3 and item 23 class 9: still
# 20 per class, but the first 20 items hold three of class 3, one of class 9, two of the rest.
CONST_TRAIN_Y = torch.arange(200) % 10
CONST_TRAIN_Y[9], CONST_TRAIN_Y[23] = 3, 9
# Test: 13 of class 0, 7 of class 3, 10 of each other class.
CONST_TEST_Y = torch.tensor([0] * 13 + [3] * 7 + [c for c in (1, 2, 4, 5, 6, 7, 8, 9) for _ in range(10)])


@pytest.mark.parametrize("value", [0.0, 0.5])
@pytest.mark.parametrize("chunk_size", [1024, 7])
def test_knn_constant_features_follow_tie_rule(value: float, chunk_size: int) -> None:
    # Every similarity is equal, so by the tie rule the neighbours are the first k train
    # items and every test item gets the same prediction:
    #   k=20: class 3 (three votes) -> accuracy = share of class 3 in test = 7 %;
    #   k=200 and k=500 (clipped to 200): all classes 20 votes, lowest id 0 wins -> 13 %.
    train = Features(torch.full((200, 16), value), CONST_TRAIN_Y)
    test = Features(torch.full((100, 16), value), CONST_TEST_Y)
    out = KNN(ks=(20, 200, 500), chunk_size=chunk_size)(train, test)
    assert out == {"knn/top1@20": 7.0, "knn/top1@200": 13.0, "knn/top1@500": 13.0}


def test_linear_constant_features_score_chance() -> None:
    # Identical test rows get one prediction; test is balanced, so top-1 is exactly 10 %.
    train = Features(torch.full((200, 16), 0.5), torch.arange(200) % 10)
    test = Features(torch.full((100, 16), 0.5), torch.arange(100) % 10)
    out = LinearProbe()(train, test)
    assert out["linear/top1"] == 10.0 and out["linear/top5"] == 50.0
    assert all(math.isfinite(v) for v in out.values())


def test_knn_weighted_vote_differs_from_majority() -> None:
    # Test point on the x axis; train: class 1 at 0 deg (sim 1), class 0 at +-60 deg
    # (sim 0.5 each), class 1 at 180 deg (sim -1, outside k=3). Majority of the 3: class 0.
    # tau=0.07: class 1 gets e^(1/0.07) = 1.6e6 > class 0's 2 e^(0.5/0.07) = 2.5e3 -> class 1.
    # tau=1:    class 1 gets e^1 = 2.72 < class 0's 2 e^0.5 = 3.30 -> class 0.
    s = math.sqrt(3) / 2
    train = Features(torch.tensor([[1.0, 0.0], [1.5, 3 * s], [0.5, -s], [-2.0, 0.0]]), torch.tensor([1, 0, 0, 1]))
    test = Features(torch.tensor([[2.0, 0.0]]), torch.tensor([1]))
    assert KNN(ks=(3,), temperature=0.07)(train, test) == {"knn/top1@3": 100.0}
    assert KNN(ks=(3,), temperature=1.0)(train, test) == {"knn/top1@3": 0.0}


def test_knn_chunking_does_not_change_results() -> None:
    train, test = noisy(500, 0), noisy(97, 1)
    assert KNN(ks=(1, 20, 200), chunk_size=10)(train, test) == KNN(ks=(1, 20, 200))(train, test)


def test_linear_l2_choice_never_sees_test_labels() -> None:
    train, test = noisy(600, 0), noisy(300, 1)
    probe = LinearProbe(l2_grid=(1e-6, 1e-4, 1e-2, 1e-1))
    out = probe(train, test)
    chosen = probe.selected["l2"]
    permuted = Features(test.x, test.y[torch.randperm(len(test.y), generator=torch.Generator().manual_seed(0))])
    shuffled = probe(train, permuted)
    assert probe.selected["l2"] == chosen and shuffled["linear/top1"] != out["linear/top1"]
    probe(train, Features(torch.randn(300, 64), test.y))
    assert probe.selected["l2"] == chosen
    assert probe(train, test) == out  # deterministic


def test_params_and_keys() -> None:
    train, test = separable(100, 0), separable(50, 1)
    knn, probe = KNN(), LinearProbe()
    assert json.loads(json.dumps(knn.params())) == {"ks": [20, 200], "temperature": 0.07}
    assert json.loads(json.dumps(probe.params())) == probe.params()
    assert set(probe.params()) == {"l2_grid", "val_fraction", "max_iter", "seed"}
    assert (knn.name, probe.name) == ("knn/npid", "linear/fast")
    assert set(knn(train, test)) == {"knn/top1@20", "knn/top1@200"}
    out = probe(train, test)
    assert set(out) == {"linear/top1", "linear/top5"} and probe.selected["l2"] in probe.l2_grid
    three = Features(train.x, train.y % 3), Features(test.x, test.y % 3)
    assert set(probe(*three)) == {"linear/top1"}


def test_gin_binds_settings() -> None:
    try:
        gin.parse_config(["knn.KNN.ks = [5]", "linear.LinearProbe.l2_grid = [0.001]"])
        assert KNN().params()["ks"] == [5] and LinearProbe().params()["l2_grid"] == [0.001]
    finally:
        gin.clear_config()
