"""Joint-embedding methods without negatives (BYOL, SimSiam, Barlow Twins): losses against
values computed independently, BYOL's momentum schedule and target network, Barlow Twins'
bias learning rate, and resume restoring every method's state exactly."""

import math

import pytest
import torch

from harness import backbone as backbone_lib
from harness import ginutil, job
from harness.optim import LARS
from harness.trainer import param_groups
from methods.barlow_twins import barlow_twins_loss
from methods.base import Batch
from methods.byol import byol_loss, byol_momentum
from methods.simsiam import simsiam_loss
from tests.conftest import assert_resumes_exactly, parse_method

# Narrow heads keep the model tests fast; the paper widths run in tests/test_methods.py.
SMALL = {
    "byol": ["byol.BYOL.hidden_dim = 64", "byol.BYOL.out_dim = 16"],
    "simsiam": ["simsiam.SimSiam.proj_dim = 32", "simsiam.SimSiam.pred_dim = 8"],
    "barlow_twins": ["barlow_twins.BarlowTwins.proj_dim = 32"],
}


def _rows(x: torch.Tensor) -> list[list[float]]:
    return x.double().tolist()


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _build(name: str, data, *bindings: str, seed: int = 0):
    parse_method(name, *SMALL[name], *bindings)
    return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, seed)


# ---- losses ---------------------------------------------------------------------------


def test_byol_loss_matches_hand_computation_and_stops_target_gradients():
    p1, p2, z1, z2 = (_randn(5, 3, seed=s).requires_grad_() for s in range(4))
    hand = sum(sum(2 - 2 * _cos(p, z) for p, z in zip(_rows(pa), _rows(zb))) / 5 for pa, zb in ((p1, z2), (p2, z1)))
    loss = byol_loss(p1, p2, z1, z2)
    assert math.isclose(loss.item(), hand, rel_tol=1e-5)
    loss.backward()
    assert z1.grad is None and z2.grad is None and p1.grad is not None
    # Closed forms: aligned predictions cost 0, orthogonal ones 2 per direction.
    e = torch.eye(2)
    assert byol_loss(e, e, 3 * e, e).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(e, e, e.flip(0), e.flip(0)).item() == pytest.approx(4.0, abs=1e-6)


def test_simsiam_loss_matches_hand_computation_and_stops_projection_gradients():
    p1, p2, z1, z2 = (_randn(4, 6, seed=s).requires_grad_() for s in range(4))
    d = [-sum(_cos(p, z) for p, z in zip(_rows(pa), _rows(zb))) / 4 for pa, zb in ((p1, z2), (p2, z1))]
    loss = simsiam_loss(p1, p2, z1, z2)
    assert math.isclose(loss.item(), (d[0] + d[1]) / 2, rel_tol=1e-5)
    loss.backward()
    assert z1.grad is None and z2.grad is None and p2.grad is not None
    z = _randn(3, 4, seed=9)
    assert simsiam_loss(2 * z, z, z, z).item() == pytest.approx(-1.0, abs=1e-6)  # its minimum


def test_barlow_twins_loss_matches_pearson_correlation_loops():
    z1, z2, lambd = _randn(6, 4, seed=1).double(), _randn(6, 4, seed=2).double(), 0.3
    n, dim = z1.shape
    a, b = _rows(z1), _rows(z2)
    ma = [sum(r[i] for r in a) / n for i in range(dim)]
    mb = [sum(r[j] for r in b) / n for j in range(dim)]
    hand = 0.0
    for i in range(dim):
        for j in range(dim):
            cov = sum((r[i] - ma[i]) * (s[j] - mb[j]) for r, s in zip(a, b))
            c = cov / math.sqrt(sum((r[i] - ma[i]) ** 2 for r in a) * sum((s[j] - mb[j]) ** 2 for s in b))
            hand += (1 - c) ** 2 if i == j else lambd * c**2
    assert math.isclose(barlow_twins_loss(z1, z2, lambd, eps=0.0).item(), hand, rel_tol=1e-9)
    assert math.isclose(barlow_twins_loss(z1.float(), z2.float(), lambd).item(), hand, rel_tol=1e-4)  # BN's eps


def test_barlow_twins_loss_closed_forms():
    # Columns of +-1 that are mean-free, unit-variance and mutually orthogonal: C = I.
    z = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
    assert barlow_twins_loss(z, 5 * z + 2, 5e-3, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)
    assert barlow_twins_loss(z, -z, 5e-3, eps=0.0).item() == pytest.approx(3 * 4.0, abs=1e-5)  # C = -I
    # Three copies of one column: every C_ij = 1, so only the off-diagonal term remains.
    col = z[:, :1].expand(4, 3)
    assert barlow_twins_loss(col, col, 0.5, eps=0.0).item() == pytest.approx(0.5 * 6, abs=1e-5)


# ---- BYOL's target network ------------------------------------------------------------


def test_byol_momentum_schedule_by_hand():
    assert byol_momentum(0, 100, 0.996) == pytest.approx(0.996, abs=1e-12)  # 1 - 0.004 * (1 + 1) / 2
    assert byol_momentum(50, 100, 0.996) == pytest.approx(0.998, abs=1e-12)  # 1 - 0.004 * (0 + 1) / 2
    assert byol_momentum(100, 100, 0.996) == pytest.approx(1.0, abs=1e-12)  # 1 - 0.004 * (-1 + 1) / 2


def test_byol_target_is_an_ema_without_gradients_and_never_exported(tiny_data, tmp_path):
    method, views = _build("byol", tiny_data)
    target = method.target
    assert all(not p.requires_grad for p in target.parameters())
    online = list(method.backbone.parameters()) + list(method.projector.parameters())
    assert len(online) == len(list(target.parameters()))
    assert not {p.data_ptr() for p in online} & {p.data_ptr() for p in target.parameters()}  # a copy
    trained = {id(p) for g in param_groups(method, 1e-6) for p in g["params"]}
    assert not trained & {id(p) for p in target.parameters()}  # the optimizer never sees it

    method.train()
    out = method.loss(Batch(views=views(tiny_data.images[:8]), labels=tiny_data.labels[:8], index=torch.arange(8)))
    out["loss"].backward()
    assert all(p.grad is None for p in target.parameters())
    with torch.no_grad():
        for p in online:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in target.parameters()]
    method.after_step(30, 100)
    tau = 1 - 0.004 * (math.cos(math.pi * 0.3) + 1) / 2
    for t, b, o in zip(target.parameters(), before, online):
        torch.testing.assert_close(t, tau * b + (1 - tau) * o, rtol=1e-6, atol=1e-6)
    for t, o in zip(target.buffers(), list(method.backbone.buffers()) + list(method.projector.buffers())):
        assert torch.equal(t, o)

    assert method.encoder() is method.backbone
    backbone_lib.export(method.encoder(), tmp_path)
    exported = backbone_lib.load(tmp_path).state_dict()
    assert exported.keys() == method.backbone.state_dict().keys()
    assert all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in exported.items())
    assert not torch.equal(next(method.target.parameters()), next(method.backbone.parameters()))


# ---- Barlow Twins' bias learning rate -------------------------------------------------


def test_barlow_twins_bias_lr_ratio_equals_a_lower_lr_for_biases_and_norms(tiny_data):
    """LARS with the gradient hooks == LARS with the 1-D parameters' lr times the ratio."""
    hooked, views = _build("barlow_twins", tiny_data)
    plain, _ = _build("barlow_twins", tiny_data, "barlow_twins.BarlowTwins.bias_lr_ratio = 1.0")
    plain.load_state_dict(hooked.state_dict())
    batch = Batch(views=views(tiny_data.images[:16]), labels=tiny_data.labels[:16], index=torch.arange(16))
    opts = [LARS(param_groups(hooked, 1.5e-6), lr=0.1), LARS(param_groups(plain, 1.5e-6), lr=0.1)]
    opts[1].param_groups[1]["lr"] = 0.1 * 0.024
    for _ in range(3):
        for m, opt in zip((hooked, plain), opts):
            opt.zero_grad()
            m.loss(batch)["loss"].backward()
            opt.step()
    for (k, a), b in zip(hooked.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
    bias = hooked.projector[1].bias
    assert not torch.equal(bias, torch.zeros_like(bias))  # the biases did move


# ---- resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["byol", "simsiam", "barlow_twins"])
def test_resume_restores_the_method_state_exactly(name, tmp_path, tiny_data):
    # checkpoint at step 2, step 3 lost
    run = assert_resumes_exactly(lambda: _build(name, tiny_data, seed=3), tiny_data, tmp_path, steps=4, stop_after=3)
    a = run.ref.state_dict()
    if name == "byol":  # the EMA target is part of that state, and it did move
        fresh, _ = _build(name, tiny_data, seed=3)
        key = next(k for k in a if k.startswith("target.0.") and k.endswith("weight"))
        assert not torch.equal(a[key], fresh.state_dict()[key])
