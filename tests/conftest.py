"""Shared fixtures: tiny generated data, gin parsed for a method at a test scale."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest
import torch

import gin
from harness import ginutil
from harness.data import SYSTEM_DIRS, ImageSet

REPO = Path(__file__).resolve().parent.parent
METHODS = sorted(p.stem for p in (REPO / "gin" / "methods").glob("*.gin"))
# A timm test model keeps unit tests fast; the embedded scale's ResNet-18 runs in the e2e test.
TINY = ["backbone.create.name = 'test_resnet'", "IMAGE_SIZE = 32"]


def fmnist_available() -> bool:
    return any((Path(d) / "train-images-idx3-ubyte.gz").exists() for d in SYSTEM_DIRS)


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def make_images(n: int = 64, classes: int = 4, channels: int = 1, size: int = 28, seed: int = 0) -> ImageSet:
    """Class-dependent blobs plus noise: learnable, but not trivially by pixels alone."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs = []
    for y in labels.tolist():
        cy, cx = (
            6 + 5 * (y % 2) + torch.randint(0, 6, (), generator=g),
            6 + 5 * (y // 2) + torch.randint(0, 6, (), generator=g),
        )
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
        img = (blob * 200 + torch.rand(size, size, generator=g) * 55).clamp(0, 255)
        imgs.append(img.expand(channels, size, size))
    return ImageSet(
        images=torch.stack(imgs).to(torch.uint8),
        labels=labels,
        classes=[str(c) for c in range(classes)],
        mean=(0.2,) * channels,
        std=(0.3,) * channels,
    )


def make_colour_images(n: int = 64, classes: int = 4, size: int = 28, seed: int = 0) -> ImageSet:
    """`make_images` tinted by class (colour carries signal), with one caption per image
    made from its class name (image-text methods)."""
    gray = make_images(n, classes, 1, size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    tints = 0.3 + 0.7 * torch.rand(classes, 3, generator=g)  # [classes, 3]
    images = (gray.images.float() * tints[gray.labels][:, :, None, None]).round().to(torch.uint8)  # [n, 3, S, S]
    x = images.float() / 255
    return ImageSet(
        images=images,
        labels=gray.labels,
        classes=gray.classes,
        mean=tuple(x.mean((0, 2, 3)).tolist()),
        std=tuple(x.std((0, 2, 3)).tolist()),
        captions=[f"a photo of a {gray.classes[y]}." for y in gray.labels.tolist()],
    )


@pytest.fixture
def tiny_data() -> ImageSet:
    return make_images()


@pytest.fixture
def tiny_colour_data() -> ImageSet:
    return make_colour_images()


def parse_method(name: str, *bindings: str) -> None:
    """Parses a method's gin file at the embedded scale with the tiny test network."""
    ginutil.parse(ginutil.run_files(name, "embedded"), [*TINY, *bindings])


@dataclass
class Resumed:
    """What `assert_resumes_exactly` ran: both methods after training, the resumed fit's
    info, and the folder of the interrupted-then-resumed run (checkpoint.pt, log.jsonl)."""

    ref: Any  # the method after the uninterrupted fit
    resumed: Any  # the method after the interrupted fit was resumed
    info: dict  # Trainer.fit's return value for the resumed fit
    folder: Path


def assert_resumes_exactly(
    make_method: Callable[[], tuple[Any, Any]],
    data: ImageSet,
    tmp_path: Path,
    *,
    steps: int,
    stop_after: int = 3,
    checkpoint_every: int = 2,
    seed: int = 3,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> Resumed:
    """Trains `steps` steps uninterrupted (``tmp_path/"a"``), and again (``tmp_path/"b"``)
    stopped after `stop_after` steps, then resumed from its last checkpoint; asserts that the
    checkpoint is at the last multiple of `checkpoint_every` before the stop, that the resumed
    fit started there, and that every entry of the two methods' state_dicts is equal
    (``torch.equal``: parameters, buffers, banks, queues, counters).

    `make_method` returns a fresh ``(method, views)`` (e.g. parse gin, then ``job.build``);
    it is called once per fit. Both fits use the real `harness.trainer.Trainer` with
    ``max_steps=steps``, ``batch_size=16``, `checkpoint_every`, no progress bar, and
    `trainer_kwargs` on top. Checks of a method's particular state stay in its test, on
    the returned `Resumed`.
    """
    from harness import store
    from harness.trainer import Interrupted, Trainer

    assert checkpoint_every <= stop_after < steps, "stop after a checkpoint, before the last step"
    kwargs = {"batch_size": 16, "progress": False, **(trainer_kwargs or {})}

    def fit(folder: Path, stop: int | None = None) -> tuple[Any, dict]:
        method, views = make_method()
        trainer = Trainer(max_steps=steps, checkpoint_every=checkpoint_every, **kwargs)
        return method, trainer.fit(method, data, views, folder, seed, stop_after=stop)

    ref, _ = fit(tmp_path / "a")
    with pytest.raises(Interrupted):
        fit(tmp_path / "b", stop_after)
    saved = (stop_after // checkpoint_every) * checkpoint_every
    assert store.load_torch(tmp_path / "b" / "checkpoint.pt")["step"] == saved
    resumed, info = fit(tmp_path / "b")
    assert info["resumed_from"] == saved
    a, b = ref.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"after resuming from step {saved}, these differ from the uninterrupted run: {differ}"
    return Resumed(ref, resumed, info, tmp_path / "b")


def _slurm_can_start() -> str | None:
    """None when a local SLURM can be started here, else the reason it cannot."""
    import os
    import shutil

    if os.geteuid() != 0:
        return "starting the local SLURM cluster needs root (scripts/local-slurm.sh)"
    if not (shutil.which("slurmctld") or shutil.which("apt-get")):
        return "neither slurmctld nor apt-get (to install slurm-wlm) is available"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node SLURM on localhost for the session (scripts/local-slurm.sh).

    Skipped with the reason where it cannot start; in CI (``CI`` set) that is a failure.
    Stops the cluster afterwards only if this fixture started it.
    """
    import os
    import subprocess

    reason = _slurm_can_start()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"slurm tests must run in CI: {reason}")
        pytest.skip(reason)
    script = str(REPO / "scripts" / "local-slurm.sh")
    was_up = subprocess.run([script, "status"], capture_output=True).returncode == 0
    up = subprocess.run([script, "up"], capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        msg = f"local SLURM did not start:\n{up.stdout[-2000:]}\n{up.stderr[-2000:]}"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    yield
    if not was_up:
        subprocess.run([script, "down"], capture_output=True, timeout=120)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        help="also run the exhaustive end-to-end tests (marker 'full': every method of every table "
        "through the CLI, ~4 more minutes on 2 cores)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="exhaustive end-to-end test: run with `pytest --full`")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)
