"""Every method's gin file trains on tiny data: finite loss, gradients everywhere,
and the loss falls on a fixed batch (DESIGN.md, Tests)."""
import pytest
import torch

from harness import ginutil, job
from methods.base import Batch
from tests.conftest import METHODS, parse_method

TRAINED = [m for m in METHODS if m not in ("random", "pixels")]


def _build(name: str, data, seed: int = 0):
    parse_method(name)
    return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, seed)


def _batch(views, data, n: int = 32) -> Batch:
    torch.manual_seed(1)
    return Batch(views=views(data.images[:n]), labels=data.labels[:n], index=torch.arange(n))


@pytest.mark.parametrize("name", TRAINED)
def test_loss_finite_and_every_parameter_gets_a_gradient(name, tiny_data):
    method, views = _build(name, tiny_data)
    method.train()
    batch = _batch(views, tiny_data)
    opt = torch.optim.SGD(method.parameters(), lr=0.01)
    for _ in range(2):  # a step first: zero-initialised residual BNs block gradients at init
        out = method.loss(batch)
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"{name}: no gradient for {missing}"


@pytest.mark.parametrize("name", TRAINED)
def test_loss_falls_on_a_fixed_batch(name, tiny_data):
    method, views = _build(name, tiny_data)
    method.train()
    batch = _batch(views, tiny_data)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = method.loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], f"{name}: {losses}"


def test_random_only_recalibrates_batchnorm(tiny_data):
    method, views = _build("random", tiny_data)
    assert not any(p.requires_grad for p in method.parameters())
    weights = {k: v.clone() for k, v in method.state_dict().items() if "running" not in k and "num_batches" not in k}
    bn = next(m for m in method.modules() if isinstance(m, torch.nn.BatchNorm2d))
    method.train()
    method.loss(_batch(views, tiny_data))
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    for k, v in method.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k


def test_pixels_features_are_the_flattened_input(tiny_data):
    method, _ = _build("pixels", tiny_data)
    assert method.pretrain_steps == 0
    x = torch.randn(5, 1, 32, 32)
    assert torch.equal(method.encoder()(x), x.flatten(1))


def test_supervised_gets_the_number_of_classes(tiny_data):
    method, _ = _build("supervised", tiny_data)
    assert method.classifier.out_features == len(tiny_data.classes)
