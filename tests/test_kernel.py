"""The optimisation kernel (harness.optim): the schedule's values by hand and against the three copies it replaced,
the weight-decay split, linear scaling, and a step's lr setting and non-finite-loss check."""

import itertools
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from harness import optim, trainer
from harness.evals import finetune
from harness.evals.voc_detection import Detection
from harness.optim import Kernel, NonFiniteLoss, lr_factor, param_groups, scaled_lr, warmup_cosine
from methods.base import cross_entropy
from tests.conftest import REPO

# --- the schedule by hand -----------------------------------------------------------------


def test_goyal_warmup_ramp_replaces_the_decay():
    assert [lr_factor(s, 10, warmup=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(1, 10, warmup=4, decay="step", milestones=[1]) == 0.5  # a milestone inside the ramp waits
    assert lr_factor(1, 10, warmup=4, decay="constant") == 0.5


def test_cosine_after_the_warmup_to_final():
    # total 10, warm-up 2: t = (step - 2) / 8
    assert lr_factor(2, 10, warmup=2) == 1.0
    assert lr_factor(6, 10, warmup=2) == 0.5  # t = 1/2: (1 + cos(pi / 2)) / 2
    assert lr_factor(10, 10, warmup=2) == 0.0
    assert lr_factor(6, 10, warmup=2, final=0.25) == 0.625  # 0.25 + 0.75 / 2
    assert lr_factor(10, 10, warmup=2, final=0.25) == lr_factor(20, 10, warmup=2, final=0.25) == 0.25
    assert lr_factor(0, 1) == 1.0 and lr_factor(1, 1) == 0.0  # one step: max(1, total - warmup)


def test_step_and_constant_decay():
    assert [lr_factor(s, 9, decay="step", milestones=[3, 6]) for s in (0, 2, 3, 5, 6, 8)] == [
        1.0,
        1.0,
        0.1,
        0.1,
        0.1**2,
        0.1**2,
    ]
    assert lr_factor(7, 9, decay="constant") == 1.0
    with pytest.raises(ValueError, match="decay 'linear'"):
        lr_factor(0, 9, decay="linear")


def test_detectron2_warmup_from_a_factor_multiplies_the_steps():
    f = {s: lr_factor(s, 8, warmup=4, warmup_from=0.25, decay="step", milestones=[2, 6]) for s in range(8)}
    assert f[0] == 0.25 and f[1] == 0.4375  # 0.25 (1 - a) + a, a = step / 4
    assert f[2] == 0.625 * 0.1 and f[3] == 0.8125 * 0.1  # a milestone inside the warm-up applies at once
    assert f[4] == 0.1 and f[6] == 0.1**2
    assert lr_factor(0, 8, warmup=4, warmup_from=0.0) == 0.0  # 0 is a factor, not "no warm-up from a factor"


def test_gin_warmup_cosine_counts_a_fraction_of_total():
    assert warmup_cosine(0, 10, warmup=0.5) == 0.2 and warmup_cosine(4, 10, warmup=0.5) == 1.0
    assert warmup_cosine(5, 10, warmup=0.5) == 1.0 and warmup_cosine(0, 10, warmup=2) == 0.5
    assert optim.constant(3, 10) == 1.0


def test_recipe_and_detection_map_their_units_to_steps():
    recipe = finetune.Recipe(epochs=3, batch_size=8, lr=1.0, schedule="step", milestones=(1, 2), warmup_epochs=0.5)
    f = finetune.schedule(recipe, per_epoch=4, total=12)  # warm-up 2 steps, milestones at steps 4 and 8
    assert [f(s) for s in (0, 1, 2, 3, 4, 8, 11)] == [0.5, 1.0, 1.0, 1.0, 0.1, 0.1**2, 0.1**2]
    g = Detection(iterations=8, warmup_iters=4, warmup_factor=0.25, lr_steps=(0.5,)).schedule()
    assert [g(s) for s in (0, 2, 3, 4, 7)] == [0.25, 0.625, 0.8125, 0.1, 0.1]


# --- the schedule against the copies it replaced (bit-identical) ---------------------------


def _old_warmup_cosine(step, total, warmup=0.0, final=0.0):  # harness/optim.py before issue 12
    w = warmup * total if warmup < 1 else warmup
    if step < w:
        return (step + 1) / w
    t = (step - w) / max(1.0, total - w)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _old_finetune(recipe, step, per_epoch, total):  # finetune.lr_factor
    warmup = round(recipe.warmup_epochs * per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if recipe.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    if recipe.schedule == "step":
        return 0.1 ** sum(step >= m * per_epoch for m in recipe.milestones)
    return 1.0


def _old_detection(d, it):  # Detection._lr_factor
    warm = 1.0
    if it < d.warmup_iters:
        a = it / d.warmup_iters
        warm = d.warmup_factor * (1 - a) + a
    return warm * 0.1 ** sum(it >= s * d.iterations for s in d.lr_steps)


def test_the_schedule_equals_the_three_copies_it_replaced():
    for total, warmup, final in itertools.product([1, 7, 47], [0, 0.1, 0.34, 1, 2.5, 10], [0.0, 0.1]):
        assert [warmup_cosine(s, total, warmup, final) for s in range(total + 1)] == [
            _old_warmup_cosine(s, total, warmup, final) for s in range(total + 1)
        ]
    for sched, ms, we, per_epoch, total in itertools.product(
        ["cosine", "step", "constant"], [(), (0.5, 2.5), (1, 2, 3)], [0, 0.4, 1.5], [1, 3, 47], [1, 15, 141]
    ):
        recipe = finetune.Recipe(epochs=1, batch_size=1, lr=1, schedule=sched, milestones=ms, warmup_epochs=we)
        f = finetune.schedule(recipe, per_epoch, total)
        assert [f(s) for s in range(total + 1)] == [
            _old_finetune(recipe, s, per_epoch, total) for s in range(total + 1)
        ]
    for its, wi, wf, steps in itertools.product([1, 5, 30], [0, 2, 6], [0.001, 0.1], [(0.75, 22 / 24), (0.4, 0.8)]):
        d = Detection(iterations=its, warmup_iters=wi, warmup_factor=wf, lr_steps=steps)
        g = d.schedule()
        assert [g(s) for s in range(its + 1)] == [_old_detection(d, s) for s in range(its + 1)]


# --- weight decay, scaling -----------------------------------------------------------------


def _net() -> nn.Sequential:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3), nn.LayerNorm(3))
    net[4].bias.requires_grad_(False)  # frozen: in no group
    return net


def test_param_groups_exempt_biases_and_norms_from_decay_and_lars():
    net = _net()
    decay, exempt = param_groups(net, 1e-4)
    assert decay["weight_decay"] == 1e-4 and "lars" not in decay
    assert exempt["weight_decay"] == 0.0 and exempt["lars"] is False
    assert [id(p) for p in decay["params"]] == [id(net[0].weight), id(net[3].weight)]
    assert [id(p) for p in exempt["params"]] == [
        id(p) for p in (net[0].bias, net[1].weight, net[1].bias, net[3].bias, net[4].weight)
    ]


def test_param_groups_norms_only_decays_biases_as_detectron2():
    net = _net()
    decay, exempt = param_groups(net, 1e-4, norms_only=True)
    assert [id(p) for p in decay["params"]] == [id(p) for p in (net[0].weight, net[0].bias, net[3].weight, net[3].bias)]
    assert [id(p) for p in exempt["params"]] == [id(net[1].weight), id(net[1].bias), id(net[4].weight)]


def test_linear_scaling_and_its_source():
    assert scaled_lr(0.1, 512, key="trainer.Trainer.base_lr") == (
        0.2,
        "trainer.Trainer.base_lr = 0.1 x batch_size 512 / 256",
    )
    assert scaled_lr(0.1, 512, scale=False) == (0.1, "lr = 0.1, scale_lr = False")
    assert trainer.Trainer(base_lr=0.3, batch_size=64).lr == 0.3 * 64 / 256


# --- a step ----------------------------------------------------------------------------------


def _kernel(model: nn.Module, lr: float = 0.5, **kw) -> Kernel:
    opt = torch.optim.SGD(param_groups(model, 0.01), lr=lr, momentum=0.9)
    return Kernel(opt, lr, lambda step: 0.5**step, 4, f"lr = {lr}", "lower the lr", **kw)


def test_step_sets_the_lr_on_every_group_and_equals_a_plain_sgd_step():
    torch.manual_seed(0)
    a, x = nn.Linear(3, 2), torch.randn(5, 3)
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    kernel = _kernel(a)
    ref = torch.optim.SGD(param_groups(b, 0.01), lr=0.5, momentum=0.9)
    for step in range(3):
        assert kernel.step(a(x).square().mean(), step) == 0.5 * 0.5**step
        assert [g["lr"] for g in kernel.optimizer.param_groups] == [0.5 * 0.5**step] * 2
        for g in ref.param_groups:
            g["lr"] = 0.5 * 0.5**step
        ref.zero_grad()
        b(x).square().mean().backward()
        ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_a_nonfinite_loss_raises_with_the_step_lr_and_source_and_does_not_step():
    net = nn.Linear(3, 2)
    before = [p.detach().clone() for p in net.parameters()]
    kernel = _kernel(net, name="probe")
    loss = net(torch.full((1, 3), float("nan"))).sum()
    with pytest.raises(
        NonFiniteLoss,
        match=r"^probe: loss is nan at step 2 of 4 \(lr 0\.125, from lr = 0\.5, "
        r"times the schedule; ce nan\); lower the lr$",
    ):
        kernel.step(loss, 2, terms={"ce": loss})
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    finite = net(torch.ones(1, 3)).sum()
    with pytest.raises(NonFiniteLoss, match=r"^loss is inf at step 0 of 4"):  # `check`: e.g. the mean across ranks
        Kernel(None, 1.0, lambda s: 1.0, 4, "lr = 1", "fix").step(finite, 0, check=torch.tensor(float("inf")))
    assert Kernel(None, 1.0, lambda s: 1.0, 4, "lr = 1", "fix").step(finite, 0) == 1.0  # nothing to train: checked
    assert trainer.NonFiniteLoss is NonFiniteLoss and issubclass(NonFiniteLoss, FloatingPointError)
    assert trainer.batch_indices is optim.batch_indices and trainer.param_groups is param_groups


def test_unsynchronised_steps_keep_the_check_and_the_next_synchronised_one_names_the_first_bad_step():
    net = nn.Linear(3, 2)
    kernel = _kernel(net)
    x = torch.ones(1, 3)
    kernel.step(net(x).sum(), 0, sync=False)
    nan = net(torch.full((1, 3), float("nan"))).sum()
    kernel.step(nan, 1, sync=False)  # not raised: the host did not wait for the device
    with pytest.raises(
        NonFiniteLoss, match=r"^loss is not finite \(first at step 1; checked at 3\) at step 1 of 4 \(lr 0\.25,"
    ):
        kernel.step(torch.tensor(1.0, requires_grad=True), 3)


def test_channels_last_and_compile_give_the_same_steps():
    from harness.backbone import create

    torch.manual_seed(0)
    nets = [create("test_resnet", in_chans=3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    init = [p.detach().clone() for p in nets[0].parameters()]
    x = torch.randn(4, 3, 16, 16)
    for net, kw in zip(nets, [{}, {"channels_last": True, "compile": "eager"}]):
        kernel = _kernel(net, lr=0.05, **kw)
        model = kernel.compiled(kernel.prepare(net))
        conv = next(p for p in net.parameters() if p.ndim == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last) == bool(kw)
        assert kernel.inputs(x).is_contiguous(memory_format=torch.channels_last) == bool(kw)
        for step in range(2):
            kernel.step(model(kernel.inputs(x)).square().mean(), step)
    assert all(torch.allclose(p, q, rtol=1e-4, atol=1e-6) for p, q in zip(nets[0].parameters(), nets[1].parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(nets[0].parameters(), init))  # they trained


def test_fp32_hooks_change_nothing_and_bf16_autocasts_the_networks_not_the_losses():
    net = nn.Linear(3, 2)
    kernel = _kernel(net)
    assert kernel.prepare(net) is net and net.weight.device.type == "cpu"
    with kernel.autocast():
        assert net(torch.ones(1, 3)).dtype == torch.float32
    with _kernel(net, precision="bf16").autocast():
        out = net(torch.ones(4, 3))
        assert out.dtype == torch.bfloat16 and net.weight.dtype == torch.float32  # weights stay float32
        assert cross_entropy(out, torch.zeros(4, dtype=torch.long)).dtype == torch.float32  # an `fp32` loss
    with pytest.raises(ValueError, match="precision 'fp16' is not one of"):
        _kernel(net, precision="fp16")


def test_an_fp32_loss_is_closer_to_float32_than_the_same_loss_in_bf16():
    """The `fp32` mark matters: NT-Xent on bf16 embeddings computed in bf16 is further from
    the float32 loss than when the marked function computes it in float32."""
    from methods.simclr import nt_xent

    torch.manual_seed(0)
    z1, z2 = torch.randn(64, 32), torch.randn(64, 32)
    exact = nt_xent(z1, z2, 0.1).item()
    b1, b2 = z1.bfloat16(), z2.bfloat16()
    marked = nt_xent(b1, b2, 0.1).item()  # cast to float32 inside
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unmarked = nt_xent.__wrapped__(b1, b2, 0.1).float().item()  # the same body in bf16
    assert abs(marked - exact) < abs(unmarked - exact), (exact, marked, unmarked)


def test_evaluations_do_not_import_the_trainer():
    code = (
        "import sys; import harness.evals.finetune, harness.evals.linear, harness.evals.semisup, "
        "harness.evals.voc_detection; assert 'harness.trainer' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_cpu_bf16_steps_give_finite_gradients_where_onednn_did_not():
    """A ResNet's 1 x 1 maps (16-px inputs) in bf16: oneDNN's convolution backward gave a non-finite
    weight gradient in 13 of 40 such steps on 2 threads; the kernel's bf16 steps use torch's own."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    kernel = Kernel(opt, 0.0, lambda step: 1.0, 1, "lr = 0", "-", precision="bf16")
    for step in range(8):  # with oneDNN about 1 in 3 steps failed: 8 clean ones by chance, p ~ 0.04
        with kernel.autocast():
            loss = net(torch.randn(288, 1, 16, 16)).float().pow(2).mean()
        kernel.step(loss, step)
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None), step


def test_features_extract_in_bf16_close_to_fp32_under_their_own_cache_key():
    from harness.backbone import create
    from harness.evals.features import FrozenFeatures, extract
    from tests.conftest import make_images

    torch.manual_seed(0)
    net, data = create("test_resnet", in_chans=1), make_images(16)
    a = extract(net, data, 28, batch_size=8, progress=False)
    b = extract(net, data, 28, batch_size=8, progress=False, precision="bf16")
    assert a.x.dtype == b.x.dtype == torch.float32 and not torch.equal(a.x, b.x)
    assert torch.nn.functional.cosine_similarity(a.x, b.x).min() > 0.99
    ff = FrozenFeatures(image_size=28)
    assert (
        ff.resolved_precision("cpu") == "fp32"
        and FrozenFeatures(28, precision="bf16").resolved_precision("cpu") == "bf16"
    )
    assert ff.key("d", "train") == ff.key("d", "train", "fp32") != ff.key("d", "train", "bf16")
    with pytest.raises(ValueError, match="features.FrozenFeatures.precision = 'fp16'"):
        FrozenFeatures(28, precision="fp16")
