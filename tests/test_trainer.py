"""Trainer: resume equals uninterrupted, non-finite loss stops with the step, logs."""

import json

import pytest
import torch

from harness import ginutil, job
from harness.trainer import NonFiniteLoss, Trainer, batch_indices
from tests.conftest import assert_resumes_exactly, parse_method

TRAINER = {"base_lr": 0.05, "optimizer": torch.optim.SGD}


def _build(data, seed=3):
    parse_method("simclr")
    return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, seed)


def _fit(folder, data, seed=3, steps=6):
    method, views = _build(data, seed)
    trainer = Trainer(max_steps=steps, batch_size=16, checkpoint_every=2, progress=False, **TRAINER)
    return method, trainer.fit(method, data, views, folder, seed)


def test_resumed_run_ends_with_exactly_the_uninterrupted_weights(tmp_path, tiny_data):
    # checkpoint at step 2, step 3 lost
    run = assert_resumes_exactly(
        lambda: _build(tiny_data), tiny_data, tmp_path, steps=6, stop_after=3, trainer_kwargs=TRAINER
    )
    steps = [json.loads(ln)["step"] for ln in (run.folder / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(6))  # the lost step was logged once, not twice


def test_resume_without_rng_restore_would_differ(tmp_path, tiny_data):
    """Guards the test above: a fresh start from another seed does not match by accident."""
    ref, _ = _fit(tmp_path / "a", tiny_data)
    other, _ = _fit(tmp_path / "c", tiny_data, seed=4)
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in ref.state_dict().items())


def test_nonfinite_loss_names_the_step(tmp_path, tiny_data):
    parse_method("simclr")
    method, views = job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), tiny_data, 0)
    trainer = Trainer(max_steps=5, batch_size=16, base_lr=1e30, optimizer=torch.optim.SGD, progress=False)
    with pytest.raises(NonFiniteLoss, match=r"at step \d+ of 5"):
        trainer.fit(method, tiny_data, views, tmp_path, 0)


def test_batch_order_is_a_pure_function_of_seed_and_step():
    a = batch_indices(100, 30, seed=1, step=4)
    assert torch.equal(a, batch_indices(100, 30, seed=1, step=4))
    epoch = torch.cat([batch_indices(90, 30, 1, s) for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(90))  # one epoch visits every item once


def test_batch_order_keeps_its_draws_while_each_epoch_permutation_is_drawn_once():
    """The cached epoch permutation gives the very batches the per-step draw gave (results and
    resume unchanged), and a caller that edits its batch cannot change another's."""
    for step in (0, 3, 4, 9):  # steps of epochs 0, 1 and 3 (3 batches of 30 an epoch of 100)
        epoch, j = divmod(step, 3)
        drawn = torch.randperm(100, generator=torch.Generator().manual_seed(1 * 100_003 + epoch))
        assert torch.equal(batch_indices(100, 30, seed=1, step=step), drawn[j * 30 : (j + 1) * 30])
    batch_indices(100, 30, seed=1, step=5).fill_(-1)
    assert (batch_indices(100, 30, seed=1, step=5) >= 0).all()


def test_curves_go_to_tensorboard_as_logged_and_a_resume_purges_the_redone_steps(tmp_path):
    from harness import curves
    from tests.conftest import assert_resumes_exactly, make_images, parse_method

    parse_method("simclr")
    data = make_images(64)

    def make():
        from harness import ginutil, job

        return job.build(ginutil.reference("job.run.method"), ginutil.reference("job.run.views"), data, 0)

    done = assert_resumes_exactly(make, data, tmp_path, steps=5, stop_after=3, checkpoint_every=2)
    logged = [json.loads(ln) for ln in (done.folder / "log.jsonl").read_text().splitlines()]
    series = curves.read(done.folder)
    assert [s for s, _ in series["pretrain/loss"]] == [r["step"] for r in logged] == [0, 1, 2, 3, 4]
    assert [v for _, v in series["pretrain/loss"]] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert [v for _, v in series["pretrain/lr"]] == pytest.approx([r["lr"] for r in logged])
