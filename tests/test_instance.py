"""Instance discrimination with banks and queues (NPID, InvaSpread, Exemplar-CNN, MoCo):
the loss maths against independent computations, the bank and queue by hand, and
resume restoring every buffer exactly."""

import copy
import math

import pytest
import torch
from torch import nn

from harness import backbone, ginutil, job, store
from methods.base import Batch, DataInfo
from methods.exemplar import surrogate_labels
from methods.invaspread import invariance_spreading
from methods.memory import MemoryBank, Queue
from methods.moco import MoCo, info_nce, split_forward
from methods.npid import NPID, estimate_log_z, nce_loss
from tests.conftest import assert_resumes_exactly, parse_method


def _info(channels: int = 1, num_images: int = 64, num_classes: int = 4) -> DataInfo:
    """The data facts a directly constructed method gets (the job passes `DataInfo.of` its data)."""
    return DataInfo(
        channels=channels,
        num_classes=num_classes,
        num_images=num_images,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )


def _unit(rows: list[list[float]]) -> list[list[float]]:
    return [[c / math.sqrt(sum(x * x for x in r)) for c in r] for r in rows]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


# --- memory bank and queue, by hand ---------------------------------------------------


def test_queue_overwrites_the_oldest_keys_first_and_wraps():
    q = Queue(4, 2)
    q.keys.zero_()
    q.push(torch.tensor([[1.0, 0], [2, 0], [3, 0]]))  # slots 0, 1, 2
    assert q.ptr.item() == 3
    assert q.keys[:, 0].tolist() == [1, 2, 3, 0]
    q.push(torch.tensor([[4.0, 0], [5, 0], [6, 0]]))  # slot 3, then wraps to 0, 1: keys 1 and 2 leave
    assert q.ptr.item() == 2
    assert q.keys[:, 0].tolist() == [5, 6, 3, 4]
    q.push(torch.tensor([[float(v), 0] for v in range(7, 13)]))  # 6 keys into 4 slots: the newest 4 stay
    assert q.ptr.item() == 2
    assert sorted(q.keys[:, 0].tolist()) == [9, 10, 11, 12] and q.keys[2, 0].item() == 9  # oldest kept next to go


def test_queue_and_bank_start_on_the_unit_sphere():
    assert torch.allclose(Queue(5, 8).keys.norm(dim=1), torch.ones(5))
    assert torch.allclose(MemoryBank(7, 8).bank.norm(dim=1), torch.ones(7))


def test_bank_update_is_momentum_then_renormalisation():
    bank = MemoryBank(3, 2, momentum=0.5)
    bank.bank.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    bank.update(torch.tensor([0, 2]), torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    s = 1 / math.sqrt(2)  # 0.5 * [1, 0] + 0.5 * [0, 1] = [0.5, 0.5] -> [s, s]
    # 0.5 * [0.6, 0.8] + 0.5 * [0, -1] = [0.3, -0.1] -> / sqrt(0.1)
    expected = [[s, s], [0.0, 1.0], [0.3 / math.sqrt(0.1), -0.1 / math.sqrt(0.1)]]
    assert torch.allclose(bank.bank, torch.tensor(expected), atol=1e-6)


# --- NPID -----------------------------------------------------------------------------


def _nce_by_hand(pos: list[float], neg: list[list[float]], z: float, n: int) -> float:
    """Wu et al. eq. 5-7 with probabilities, not logs: h = P / (P + m/n), P = exp(s) / Z."""
    total = 0.0
    for s_pos, s_negs in zip(pos, neg):
        q = len(s_negs) / n
        p = math.exp(s_pos) / z
        total -= math.log(p / (p + q))
        for s in s_negs:
            p = math.exp(s) / z
            total -= math.log(1 - p / (p + q))
    return total / len(pos)


def test_nce_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(3, generator=g) * 2, torch.randn(3, 5, generator=g) * 2
    for n, z in ((10, 7.0), (1000, 50.0), (40, 0.3)):
        got = nce_loss(pos, neg, torch.tensor(math.log(z)), n).item()
        assert math.isclose(got, _nce_by_hand(pos.tolist(), neg.tolist(), z, n), rel_tol=1e-5)


def test_z_is_n_times_the_mean_noise_similarity():
    neg = torch.tensor([[0.0, math.log(2.0)], [math.log(3.0), math.log(6.0)]])
    assert math.isclose(estimate_log_z(neg, 100).exp().item(), 100 * (1 + 2 + 3 + 6) / 4, rel_tol=1e-6)


class _Net(nn.Module):
    """A tiny backbone without BatchNorm: flatten, linear."""

    def __init__(self, pixels: int = 16, width: int = 6):
        super().__init__()
        self.fc, self.num_features = nn.Linear(pixels, width), width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_npid_fixes_z_after_the_first_batch_and_updates_the_bank_at_the_batch():
    torch.manual_seed(0)
    m = NPID(_Net(), _info(num_images=20), out_dim=4, num_negatives=8)
    assert torch.isnan(m.log_z)
    before = m.memory.bank.clone()
    batch = Batch(
        views=[torch.randn(5, 1, 4, 4)], labels=torch.zeros(5, dtype=torch.long), index=torch.tensor([3, 0, 7, 19, 11])
    )
    out = m.loss(batch)
    feats = nn.functional.normalize(m.head(m.backbone(batch.views[0])), dim=1).detach()
    m.after_step(0, 10)
    assert m.log_z.item() == out["log_z"].item()
    expected = nn.functional.normalize(0.5 * before[batch.index] + 0.5 * feats, dim=1)
    assert torch.allclose(m.memory.bank[batch.index], expected, atol=1e-6)
    others = torch.ones(20, dtype=torch.bool)
    others[batch.index] = False
    assert torch.equal(m.memory.bank[others], before[others])
    assert m.loss(batch)["log_z"].item() == out["log_z"].item()  # a constant from now on
    # prox = |f - v|^2 with v the bank entry before the update; loss = instance + 30 * prox
    assert math.isclose(out["prox"].item(), (feats - before[batch.index]).pow(2).sum(1).mean().item(), rel_tol=1e-5)
    assert math.isclose(out["loss"].item(), out["instance"].item() + 30 * out["prox"].item(), rel_tol=1e-5)


# --- InvaSpread -----------------------------------------------------------------------


def _invaspread_by_hand(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    z = _unit(z1.tolist() + z2.tolist())
    n2 = len(z)
    total = 0.0
    for a in range(n2):
        partner = (a + n2 // 2) % n2
        e = {j: math.exp(_dot(z[a], z[j]) / tau) for j in range(n2) if j != a}
        denom = sum(e.values())
        total -= math.log(e[partner] / denom)
        total -= sum(math.log(1 - e[j] / denom) for j in e if j != partner)
    return total / n2


def test_invariance_spreading_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    for tau in (0.1, 0.5, 1.0):
        got = invariance_spreading(z1, z2, tau).item()
        assert math.isclose(got, _invaspread_by_hand(z1, z2, tau), rel_tol=1e-5)


def test_invariance_spreading_closed_form_for_two_orthogonal_pairs():
    # z1 = z2 = [e1, e2]: for each anchor, positive sim 1, the two negatives sim 0.
    z = torch.eye(2)
    tau = 0.5
    p_pos = math.exp(2) / (math.exp(2) + 2)
    p_neg = 1 / (math.exp(2) + 2)
    expected = -(math.log(p_pos) + 2 * math.log(1 - p_neg))
    assert math.isclose(invariance_spreading(z, z, tau).item(), expected, rel_tol=1e-6)


# --- Exemplar-CNN ---------------------------------------------------------------------


def test_surrogate_labels_keep_seed_images_in_every_view():
    classes = torch.tensor([-1, 2, 0, -1, 1])  # images 1, 2, 4 are seeds of classes 2, 0, 1
    keep, y = surrogate_labels(classes, torch.tensor([4, 3, 1]), num_views=2)
    assert keep.tolist() == [True, False, True, True, False, True]
    assert y.tolist() == [1, 2, 1, 2]


def test_exemplar_draws_distinct_seeds_clipped_to_the_data(tiny_data):
    parse_method("exemplar")
    m, _ = job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), tiny_data, 0)
    classes = m.surrogate_class
    assert m.classifier.out_features == len(tiny_data)  # 8000 surrogate classes clipped to 64 images
    assert sorted(classes.tolist()) == list(range(len(tiny_data)))


# --- MoCo -----------------------------------------------------------------------------


def _info_nce_by_hand(q: list, k: list, queue: list, tau: float) -> float:
    total = 0.0
    for qi, ki in zip(q, k):
        logits = [_dot(qi, ki) / tau] + [_dot(qi, kj) / tau for kj in queue]
        total -= logits[0] - math.log(sum(math.exp(s) for s in logits))
    return total / len(q)


def test_info_nce_matches_hand_computation():
    g = torch.Generator().manual_seed(2)
    q, k, queue = (nn.functional.normalize(torch.randn(s, 5, generator=g), dim=1) for s in (3, 3, 6))
    for tau in (0.07, 0.2, 1.0):
        got = info_nce(q, k, queue, tau).item()
        assert math.isclose(got, _info_nce_by_hand(q.tolist(), k.tolist(), queue.tolist(), tau), rel_tol=1e-5)


def test_split_forward_normalises_each_sub_batch_on_its_own():
    bn = nn.BatchNorm1d(3, affine=False)
    x = torch.randn(8, 3) * 5 + 2
    y = split_forward(bn, x, 4)
    for part in y.chunk(4):
        assert torch.allclose(part.mean(0), torch.zeros(3), atol=1e-5)


def test_split_forward_in_one_pass_equals_a_forward_per_sub_batch():
    parse_method("moco")  # the embedded backbone with the tiny test network
    torch.manual_seed(0)
    net = backbone.create(in_chans=1).train()
    ref = copy.deepcopy(net)
    x = torch.randn(16, 1, 32, 32)
    y, y_ref = split_forward(net, x, 4), torch.cat([ref(p) for p in x.chunk(4)])
    assert torch.allclose(y, y_ref, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        # float32 sums in another order: tolerance relative to the gradient's scale (a wrong
        # split would differ by the gradient's own size)
        assert torch.allclose(p.grad, q.grad, atol=1e-4 * float(q.grad.abs().max()), rtol=1e-3), name
    assert not any("forward" in vars(m) for m in net.modules())  # the BatchNorm layers are restored


def test_split_forward_moves_running_statistics_to_the_mean_of_the_sub_batches():
    bn = nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    split_forward(bn, x, 4)
    parts = x.chunk(4)
    mean = torch.stack([p.mean((0, 2, 3)) for p in parts]).mean(0)
    var = torch.stack([p.transpose(0, 1).reshape(3, -1).var(1) for p in parts]).mean(0)  # unbiased, as torch
    assert torch.allclose(bn.running_mean, 0.1 * mean, atol=1e-5)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * var, atol=1e-5)
    assert bn.num_batches_tracked.item() == 1


def test_moco_shuffle_keeps_keys_aligned_with_their_queries():
    """Without BatchNorm, shuffling sub-batches must not change anything: keys come back in order."""
    torch.manual_seed(0)
    a = MoCo(_Net(), _info(num_images=40), out_dim=4, hidden_dim=8, queue_size=12, bn_splits=1)
    b = MoCo(_Net(), _info(num_images=40), out_dim=4, hidden_dim=8, queue_size=12, bn_splits=4)
    b.load_state_dict(a.state_dict())
    batch = Batch(
        views=[torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4)],
        labels=torch.zeros(8, dtype=torch.long),
        index=torch.arange(8),
    )
    assert torch.allclose(a.loss(batch)["loss"], b.loss(batch)["loss"], atol=1e-6)
    assert torch.allclose(a._keys, b._keys, atol=1e-6)


def test_moco_queue_is_clipped_to_half_the_data_and_the_key_encoder_is_an_ema(tiny_data):
    parse_method("moco")
    m, views = job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), tiny_data, 0)
    assert len(m.queue) == len(tiny_data) // 2  # 65536 clipped
    assert not any(p.requires_grad for p in m.key_encoder.parameters())
    assert not list(m.key_encoder.buffers())  # BN without running statistics: keys change no state
    m.train()
    for p in list(m.backbone.parameters()) + list(m.head.parameters()):
        p.data.add_(torch.randn_like(p))  # the query moves away from the key encoder
    key_before = [p.clone() for p in m.key_encoder.parameters()]
    batch = Batch(views=views(tiny_data.images[:16]), labels=tiny_data.labels[:16], index=torch.arange(16))
    m.loss(batch)
    assert all(torch.equal(a, b) for a, b in zip(key_before, m.key_encoder.parameters()))  # loss leaves it alone
    m.after_step(0, 10)
    query = list(m.backbone.parameters()) + list(m.head.parameters())
    for old, new, q in zip(key_before, m.key_encoder.parameters(), query):
        assert torch.allclose(new, 0.999 * old + 0.001 * q, atol=1e-6)
    assert m.queue.ptr.item() == 16


# --- resume ---------------------------------------------------------------------------


def _build(name: str, data, seed=3):
    parse_method(name, *(["moco.MoCo.bn_splits = 2"] if name == "moco" else []))  # fewer, faster forwards
    return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, seed)


@pytest.mark.parametrize(
    "name, state",
    [
        ("npid", ["memory.bank", "log_z"]),
        ("moco", ["queue.keys", "queue.ptr", "key_encoder.0.", "key_encoder.1."]),
        ("exemplar", ["surrogate_class"]),
    ],
)
def test_resume_restores_banks_queues_and_key_encoder_exactly(name, state, tmp_path, tiny_data):
    # checkpoint at step 2, step 3 lost
    run = assert_resumes_exactly(
        lambda: _build(name, tiny_data),
        tiny_data,
        tmp_path,
        steps=5,
        stop_after=3,
        trainer_kwargs={"base_lr": 0.05, "optimizer": torch.optim.SGD},
    )
    saved = store.load_torch(run.folder / "checkpoint.pt")  # the last checkpoint (step 5) holds that state too
    assert all(any(k.startswith(s) for k in saved["method"]) for s in state)
    a = run.ref.state_dict()
    if name == "moco":
        assert a["queue.ptr"].item() == (5 * 16) % len(run.ref.queue) != 0
    if name == "npid":
        assert torch.isfinite(a["log_z"])
