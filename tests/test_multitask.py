"""Multi-task self-supervision: the weighted sum of the tasks' losses on hand-sliced batches,
one shared backbone that every task trains, the data facts each task receives (through the
public builder), refusal passed on, and resume."""

import functools

import pytest
import torch
from torch import nn

import methods.multitask
from harness import ginutil, job
from harness.errors import Unsupported
from methods.base import Batch, DataInfo, Method, build_method
from methods.multitask import MultiTask
from tests.conftest import assert_resumes_exactly, make_colour_images, parse_method

# RotNet + Exemplar on the gin file's views: RotNet reads view 0, Exemplar views 2-3 (works on gray data).
ROT_EX = [
    "multitask.MultiTask.tasks = [@rotnet.RotNet, @exemplar.Exemplar]",
    "multitask.MultiTask.weights = [1.0, 1.0]",
    "multitask.MultiTask.inputs = [[0], [2, 3]]",
]


# Small heads keep the paper combination's tests fast (its 4096-wide relative-position MLP).
SMALL_HEADS = [
    "exemplar.Exemplar.num_surrogate = 20",
    "relative_location.RelativeLocation.patch_dim = 64",
    "relative_location.RelativeLocation.hidden_dim = 64",
    "colorization.Colorization.hidden_dim = 32",
]
# The paper's combination as gin/methods/multitask.gin binds it (the embedded scale file
# replaces it with the two tasks that run on gray data).
PAPER_TASKS = [
    "multitask.MultiTask.tasks = [@relative_location.RelativeLocation, @colorization.Colorization, @exemplar.Exemplar]",
    "multitask.MultiTask.weights = [1.0, 1.0, 1.0]",
    "multitask.MultiTask.inputs = [[0], [1], [2, 3]]",
]


def _build(data, *bindings, seed=0):
    parse_method("multitask", *ROT_EX, *bindings)
    return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, seed)


def _batch(views, data, n=32):
    torch.manual_seed(1)
    return Batch(views=views(data.images[:n]), labels=data.labels[:n], index=torch.arange(n))


def test_loss_is_the_weighted_sum_of_the_tasks_losses_on_their_own_views_and_images(tiny_data):
    method, views = _build(
        tiny_data, "multitask.MultiTask.weights = [0.3, 2.0]", "exemplar.Exemplar.num_surrogate = 64"
    )
    method.train()
    batch = _batch(views, tiny_data)
    assert len(batch.views) == 4
    torch.manual_seed(5)
    out = method.loss(batch)
    rotnet, exemplar = method.tasks
    torch.manual_seed(5)  # by hand: RotNet reads view 0 of the even images, Exemplar views 2-3 of the odd ones
    even, odd = slice(0, None, 2), slice(1, None, 2)
    rot = rotnet.loss(Batch(views=[batch.views[0][even]], labels=batch.labels[even], index=batch.index[even]))
    ex = exemplar.loss(
        Batch(views=[batch.views[2][odd], batch.views[3][odd]], labels=batch.labels[odd], index=batch.index[odd])
    )
    assert torch.allclose(out["loss"], 0.3 * rot["loss"] + 2.0 * ex["loss"], rtol=1e-5)
    assert torch.allclose(out["rotnet/loss"], rot["loss"]) and torch.allclose(out["exemplar/acc"], ex["acc"])
    assert out["exemplar/seeds"].item() == 32  # 16 images x 2 views, every image a seed


def test_without_inputs_or_split_every_task_sees_every_view_and_image(tiny_data):
    method, views = _build(tiny_data, "multitask.MultiTask.inputs = None", "multitask.MultiTask.split_batch = False")
    batch = _batch(views, tiny_data)
    for sub in method.task_batches(batch):
        assert len(sub.views) == 4 and all(torch.equal(a, b) for a, b in zip(sub.views, batch.views))
        assert torch.equal(sub.index, batch.index)


def test_one_backbone_and_every_task_head_trains(tiny_data):
    method, views = _build(tiny_data, "exemplar.Exemplar.num_surrogate = 64")
    assert method.encoder() is method.backbone
    assert all(t.backbone is method.backbone for t in method.tasks)
    n_shared = sum(p.numel() for p in method.backbone.parameters())
    n_heads = sum(p.numel() for t in method.tasks for n, p in t.named_parameters() if not n.startswith("backbone."))
    assert sum(p.numel() for p in method.parameters()) == n_shared + n_heads  # the backbone is counted once
    method.train()
    batch = _batch(views, tiny_data)
    opt = torch.optim.SGD(method.parameters(), lr=0.01)
    for _ in range(2):  # a step first: zero-initialised residual BNs block gradients at init
        opt.zero_grad()
        method.loss(batch)["loss"].backward()
        opt.step()
    for name, p in [
        *method.tasks[0].classifier.named_parameters(),
        *method.tasks[1].classifier.named_parameters(),
        *method.backbone.named_parameters(),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # each task alone reaches the backbone: its gradient is the sum of theirs
    first = next(method.backbone.parameters())  # the stem's first convolution
    grads = []
    for t, sub in zip(method.tasks, method.task_batches(batch)):
        opt.zero_grad()
        t.loss(sub)["loss"].backward()
        grads.append(first.grad.clone())
        assert grads[-1].abs().sum() > 0
    opt.zero_grad()
    method.loss(batch)["loss"].backward()
    assert torch.allclose(first.grad, grads[0] + grads[1], rtol=1e-4, atol=1e-6)


class _Probe(Method):
    """A task that records the data facts it was built with, and refuses grayscale."""

    def __init__(self, backbone: nn.Module, data: DataInfo):
        super().__init__(backbone)
        if data.channels != 3:
            raise Unsupported(f"probe needs colour (3-channel) images; this dataset has {data.channels} channel")
        self.data = data
        self.head = nn.Linear(backbone.num_features, 1)

    def loss(self, batch):
        return {"loss": self.head(self.backbone(batch.views[0])).mean()}


def test_tasks_get_the_data_facts_the_job_gives_a_method_and_a_refusal_skips_the_whole_run(tiny_data, monkeypatch):
    import timm

    colour, net = make_colour_images(), timm.create_model("test_resnet", num_classes=0)
    direct = build_method(_Probe, net, DataInfo.of(colour))
    assert direct.data.num_images == 64 and direct.data.captions == tuple(colour.captions)
    calls = []

    def spy(method, backbone, data):  # the public builder, watched
        calls.append((method, backbone, data))
        return build_method(method, backbone, data)

    monkeypatch.setattr(methods.multitask, "build_method", spy)
    info = DataInfo.of(colour)
    multi = build_method(functools.partial(MultiTask, tasks=[_Probe, _Probe]), net, info)
    assert [(m, b) for m, b, _ in calls] == [(_Probe, multi.backbone)] * 2  # each task once, on the shared backbone
    assert all(d is info for _, _, d in calls) and all(t.data is info for t in multi.tasks)  # MultiTask's own
    assert info == direct.data
    assert multi.names == ["test_multitask0", "test_multitask1"]
    with pytest.raises(Unsupported, match="multitask: task _Probe: probe needs colour"):
        build_method(functools.partial(MultiTask, tasks=[_Probe]), multi.backbone, DataInfo.of(tiny_data))
    with pytest.raises(ValueError, match="2 tasks need as many weights.*multitask.MultiTask.weights"):
        MultiTask(net, DataInfo.of(colour), tasks=[_Probe, _Probe], weights=[1.0])


def test_the_papers_combination_needs_colour_and_trains_on_it(tiny_data):
    parse_method("multitask", *PAPER_TASKS, *SMALL_HEADS)  # relative position + colorization + exemplar
    method, views = ginutil.reference("job.run.method"), ginutil.reference("job.run.views")
    with pytest.raises(Unsupported, match="multitask: task Colorization: colorization needs colour"):
        job.build(method, views, tiny_data, 0)
    colour = make_colour_images()
    m, v = job.build(method, views, colour, 0)
    assert m.names == ["relative_location", "colorization", "exemplar"]
    out = m.loss(_batch(v, colour, n=30))
    assert torch.isfinite(out["loss"]) and {"relative_location/loss", "colorization/loss", "exemplar/loss"} <= set(out)
    assert torch.allclose(out["loss"], out["relative_location/loss"] + out["colorization/loss"] + out["exemplar/loss"])


def test_resume_restores_every_tasks_state_exactly(tmp_path):
    colour = make_colour_images()  # the paper's combination: colorization's bin counts, exemplar's seeds

    def make():
        parse_method("multitask", *PAPER_TASKS, *SMALL_HEADS)
        return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), colour, 3)

    run = assert_resumes_exactly(make, colour, tmp_path, steps=5, stop_after=3)
    a = run.ref.state_dict()
    assert any(k.startswith("tasks.2.surrogate_class") for k in a)
    state = [
        k
        for k in a
        if k.startswith("tasks.1.")
        and not k.startswith("tasks.1.backbone.")
        and "running" not in k
        and "num_batches" not in k
        and not a[k].requires_grad
    ]
    assert state  # colorization keeps state besides weights
