"""Clustering family (swav, deepcluster, sela): the maths against values computed
independently, DeepCluster's epoch-boundary re-clustering, and exact resume of every
method's state (banks, labels, centroids, prototypes, queue)."""

import math

import numpy as np
import pytest
import torch

from harness import ginutil, job
from harness.trainer import batch_indices
from methods.base import Batch
from methods.deepcluster import fill_empty_clusters, uniform_cluster_loss
from methods.sela import heads_cross_entropy, self_label
from methods.sinkhorn import sinkhorn, sinkhorn_scalings
from methods.swav import swapped_prediction
from tests.conftest import assert_resumes_exactly, parse_method

SMALL = "SMALL_IMAGE_SIZE = 16"  # the embedded scale's small crops


def test_sinkhorn_one_iteration_by_hand():
    # exp(scores / 1) = M = [[1, 2], [3, 4], [2, 2]], total 14. Columns to 1/2: col sums 6/14 and
    # 8/14 -> [[1/12, 1/8], [1/4, 1/4], [1/6, 1/8]]. Rows to 1/3: row sums 5/24, 1/2, 7/24 ->
    # [[2/15, 1/5], [1/6, 1/6], [4/21, 1/7]]; columns now 103/210 and 107/210.
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0], [2.0, 2.0]])
    q = sinkhorn(m.log(), epsilon=1.0, iterations=1)
    expected = torch.tensor([[2 / 15, 1 / 5], [1 / 6, 1 / 6], [4 / 21, 1 / 7]])
    assert torch.allclose(q, expected, atol=1e-6)
    assert torch.allclose(q.sum(0), torch.tensor([103 / 210, 107 / 210]), atol=1e-6)
    q = sinkhorn(m.log(), epsilon=1.0, iterations=200)
    assert torch.allclose(q.sum(1), torch.full((3,), 1 / 3), atol=1e-6)
    assert torch.allclose(q.sum(0), torch.full((2,), 1 / 2), atol=1e-6)


def _swav_loss_by_hand(scores, codes, tau):
    """SwAV eq. 1 with python floats: mean over assigned crops, then over the other crops."""
    total = 0.0
    for i, q in enumerate(codes):
        sub = 0.0
        for v, s in enumerate(scores):
            if v == i:
                continue
            for row_s, row_q in zip(s.tolist(), q.tolist()):
                z = math.log(sum(math.exp(x / tau) for x in row_s))
                sub += -sum(qk * (x / tau - z) for qk, x in zip(row_q, row_s)) / len(s)
        total += sub / (len(scores) - 1)
    return total / len(codes)


def test_swapped_prediction_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(2, 3, generator=g) for _ in range(3)]  # 3 crops, B = 2, K = 3
    codes = [torch.softmax(torch.randn(2, 3, generator=g), 1) for _ in range(2)]
    for tau in (0.1, 1.0):
        assert math.isclose(
            swapped_prediction(scores, codes, tau).item(), _swav_loss_by_hand(scores, codes, tau), rel_tol=1e-5
        )


def test_self_label_matches_the_papers_multiplicative_sinkhorn():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 4, generator=g) * 0.3
    labels, log_col = self_label(logits, lam=25.0, tolerance=1e-9)
    # SeLa's cpu_sk written with numpy: P^lambda, r = 1/K / (P c), c = 1/N / (r P), argmax of P * c * r.
    p = (torch.softmax(logits.double(), 1).numpy() ** 25).T  # [K, N]
    k, n = p.shape
    c = np.ones((n, 1)) / n
    for _ in range(5000):
        r = (1 / k) / (p @ c)
        c = (1 / n) / (r.T @ p).T
    plan = p * c.squeeze() * r  # [K, N]
    assert np.allclose(plan.sum(0), 1 / n) and np.allclose(plan.sum(1), 1 / k, atol=1e-8)
    assert torch.equal(labels, torch.from_numpy(plan.argmax(0)))
    assert np.allclose(log_col.numpy() - log_col.numpy()[0], np.log(r.squeeze() / r[0, 0]), atol=1e-6)


def test_sinkhorn_tolerance_stops_early():
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(2))
    u_few, _ = sinkhorn_scalings(x, 10_000, tolerance=0.1, check_every=10)
    u_all, _ = sinkhorn_scalings(x, 10_000, tolerance=1e-12)
    assert (u_few - u_all).abs().max() < 0.1


def test_uniform_cluster_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels, sizes = torch.tensor([0, 0, 1]), torch.tensor([2, 1])
    ce = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(1 / (1 + math.e)), math.log(2)]
    w = [3 / (2 * 2), 3 / (2 * 2), 3 / (2 * 1)]  # N / (non-empty clusters * cluster size)
    expected = sum(a * b for a, b in zip(w, ce)) / 3
    assert math.isclose(uniform_cluster_loss(logits, labels, sizes).item(), expected, rel_tol=1e-6)
    # Over a whole data set it equals sampling clusters uniformly: the mean of per-cluster means.
    assert math.isclose(expected, ((ce[0] + ce[1]) / 2 + ce[2]) / 2, rel_tol=1e-6)


def test_heads_cross_entropy_by_hand():
    logits = torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]]])  # 2 heads, 1 image, K = 2
    labels = torch.tensor([[0], [0]])
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(3))) / 2
    assert math.isclose(heads_cross_entropy(logits, labels).item(), expected, rel_tol=1e-6)


def test_fill_empty_clusters_splits_a_cluster():
    torch.manual_seed(0)
    x = torch.randn(20, 3)
    centroids = torch.zeros(4, 3)
    centroids[:2] = torch.stack([x[:10].mean(0), x[10:].mean(0)])
    labels = fill_empty_clusters(x, torch.arange(20) // 10, centroids)
    assert (torch.bincount(labels, minlength=4) > 0).all()
    for c in range(4):
        assert torch.allclose(centroids[c], x[labels == c].mean(0))


def _build(name, data, *bindings, seed=3):
    parse_method(name, *bindings)
    return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, seed)


def test_deepcluster_reclusters_at_the_epoch_boundary(tiny_data):
    method, views = _build("deepcluster", tiny_data)  # 64 images, batch 16: an epoch is 4 steps
    method.train()
    head_before = method.classifier.weight.clone()
    for step in range(8):
        idx = batch_indices(len(tiny_data), 16, seed=0, step=step)
        out = method.loss(Batch(views(tiny_data.images[idx]), tiny_data.labels[idx], idx))
        if step < 4:  # warm-up epoch: the loss is zero, the labels are unset
            assert out["loss"].item() == 0 and (method.labels == -1).all()
        method.after_step(step, total=100)
        if step == 3:
            assert int(method.clusterings) == 1 and (method.labels >= 0).all()
            assert not torch.equal(method.classifier.weight, head_before)  # re-initialised
            first = method.centroids.clone()
        if step in (4, 5, 6):
            assert int(method.clusterings) == 1
    assert int(method.clusterings) == 2 and not torch.equal(method.centroids, first)
    # the labels are the new k-means assignment of the bank (nearest centroid of each image)
    assert torch.equal(method.labels, method._nearest(method.bank))


def test_swav_prototypes_frozen_for_the_first_steps(tiny_data):
    method, views = _build("swav", tiny_data, SMALL, "swav.SwAV.freeze_prototypes_steps = 1")
    batch = Batch(views(tiny_data.images[:8]), tiny_data.labels[:8], torch.arange(8))
    method.loss(batch)["loss"].backward()
    assert method.prototypes.weight.grad is None
    method.after_step(0, 10)
    method.loss(batch)["loss"].backward()
    assert method.prototypes.weight.grad.abs().sum() > 0


RESUME = {  # bindings, steps, stop_after (checkpoints every 2 steps), a check that state is not trivial
    "swav": (
        [SMALL, "swav.SwAV.freeze_prototypes_steps = 2", "swav.SwAV.queue_length = 32"],
        6,
        3,
        lambda m: int(m.queue_filled) == 32 and m.queue.abs().sum() > 0,
    ),
    "deepcluster": (["deepcluster.DeepCluster.min_clusterings = 1"], 10, 5, lambda m: int(m.clusterings) == 2),
    "sela": ([], 6, 3, lambda m: int(m.updates) >= 3 and bool(m.covered.any())),
}


@pytest.mark.parametrize("name", sorted(RESUME))
def test_resume_restores_the_methods_state_exactly(name, tmp_path, tiny_data):
    bindings, steps, stop, nontrivial = RESUME[name]
    run = assert_resumes_exactly(
        lambda: _build(name, tiny_data, *bindings), tiny_data, tmp_path, steps=steps, stop_after=stop
    )
    assert nontrivial(run.ref)
