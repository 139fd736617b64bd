"""One run, in its own process: parse gin, pretrain (or reuse), evaluate, store.

``job.run`` is the root configurable: a table binds it (evaluations, seed) and a
method's gin file binds its method and views; everything else is a ``@reference``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import torch
from torch import nn

import gin
from harness import backbone as backbone_lib
from harness import data as data_lib
from harness import ginutil, published, store
from harness import trainer as trainer_lib
from harness.curves import Curves
from harness.data import ImageSet
from harness.errors import Unsupported
from harness.evals import Context
from harness.evals import protocol as protocol_lib
from harness.evals.features import FrozenFeatures
from harness.runspec import RunSpec
from harness.trainer import Trainer
from harness.views import Views
from methods.base import DataInfo, Method, build_method


def _log_path() -> str | None:
    try:
        import submitit

        return str(submitit.JobEnvironment().paths.stdout)
    except Exception:  # noqa: BLE001 - not inside a submitit job
        return None


def build(
    method: Callable[..., Method], views: Callable[..., Views], data: ImageSet, seed: int
) -> tuple[Method, Views]:
    """The method on a freshly initialised backbone (initialisation depends on `seed` only),
    built with the facts of `data` (``method(backbone, data=DataInfo.of(data))``,
    `methods.base.build_method`), and the views normalised with the data's statistics."""
    torch.manual_seed(seed)
    net = backbone_lib.create(in_chans=data.channels)
    return build_method(method, net, DataInfo.of(data)), views(mean=data.mean, std=data.std)


_NOT_ARTEFACTS = {"checkpoint.pt", "log.jsonl", "config.gin", "pretrain.json", ".lock", ".run.lock"}


def pretrain(
    folder: Path,
    method: Callable[..., Method],
    dataset,
    views: Callable[..., Views],
    trainer: Trainer,
    seed: int,
    stop_after: int | None = None,
) -> dict:
    """Pretrains into `folder` (resuming a checkpoint there), exports the encoder, writes
    pretrain.json with the exported files' sizes and SHA-256 (`store.file_meta`)."""
    t0, cpu0 = time.time(), time.process_time()
    rank = trainer_lib.distributed()[0]
    if rank == 0 and (folder / "features").is_dir():  # caches of an encoder that is about to be replaced
        shutil.rmtree(folder / "features")
    data = dataset.split("pretrain")
    m, v = build(method, views, data, seed)
    fit = trainer.fit(m, data, v, folder, seed, stop_after=stop_after)
    if rank > 0:  # other ranks only help train; rank 0 writes
        return fit
    exported = m.encoder() is m.backbone
    if exported:
        backbone_lib.export(m.backbone, folder)
    if hasattr(m, "export"):  # parts some protocol needs besides the encoder (CLIP's text tower)
        cast(Any, m).export(folder)
    artefacts = {
        f.name: store.file_meta(f)
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name not in _NOT_ARTEFACTS and not f.name.startswith(".")
    }
    # cpu_seconds: CPU time of all this process's threads; unlike wall time it barely moves
    # when other jobs share the cores (BENCHMARKS.md).
    record = {
        "status": store.Status.DONE.value,
        "seconds": time.time() - t0,
        "cpu_seconds": time.process_time() - cpu0,
        **fit,
        "encoder": "exported" if exported else "built",
        "artefacts": artefacts,
        "git": store.git_revision(),
        "finished": store.now(),
    }
    store.write_text(folder / "config.gin", gin.operative_config_str())
    store.write_json(folder / "pretrain.json", record)
    return record


def encoder_for_eval(folder: Path, method: Callable[..., Method], data: ImageSet, pre: dict) -> nn.Module:
    """The encoder that pretraining `pre` (its pretrain.json) exported, checked against its
    recorded SHA-256 and rebuilt by timm alone; a method that exports none (pixels: no
    weights) builds its own. Never a fresh network in place of a missing file."""
    if pre.get("encoder") != "exported":
        no_views = cast("Callable[..., Views]", lambda **_: None)  # only the encoder is used
        return build(method, no_views, data, seed=0)[0].encoder()
    for name in ("encoder.pt", "encoder.json"):
        if problem := store.file_problem(folder / name, pre["artefacts"].get(name), full=True):
            raise store.StoreError(
                f"{problem}. Fix: delete {folder / 'pretrain.json'} and run the sweep again "
                "(it exports the encoder again from the final checkpoint, or pretrains again)"
            )
    return backbone_lib.load(folder)


def _pretrained(
    pre_dir: Path,
    method: Callable[..., Method],
    dataset,
    views: Callable[..., Views],
    trainer: Trainer,
    seed: int,
    pretrain_id: str,
) -> dict:
    """The pretraining record of `pre_dir` once every file it lists matches its checksum;
    pretrains (resuming the checkpoint, so a lost export is rebuilt in seconds) otherwise."""
    with store.locked(pre_dir):
        store.clean_stale_temps(pre_dir)
        problems = store.pretrain_problems(pre_dir, full=True)
        if not problems:
            print(f"pretraining {pretrain_id} already done: reusing {pre_dir}", flush=True)
            return cast(dict, store.read_json(pre_dir / "pretrain.json"))  # checked: no problems
        if (pre_dir / "pretrain.json").exists():
            print(f"pretraining {pretrain_id} cannot be reused ({'; '.join(problems)}): rebuilding it", flush=True)
        return pretrain(pre_dir, method, dataset, views, trainer, seed)


def conditions(dataset, encoder: nn.Module, features: FrozenFeatures, trainer: Trainer) -> dict:
    """What published numbers are matched on (`harness.published`): the dataset, the encoder as
    the reference CSV names it, the view size, and the pretraining's epochs and batch size."""
    spec = getattr(encoder, "sslbench_spec", None) or {"name": type(encoder).__name__.lower()}
    return {
        "dataset": getattr(dataset, "name", type(dataset).__name__),
        "backbone": published.backbone_name(spec),
        "image_size": features.image_size,
        "pretrain_epochs": trainer.epochs,
        "batch_size": trainer.batch_size,
    }


@gin.configurable(module="job", denylist=["spec"])
def run(
    spec: RunSpec,
    method: Callable[..., Method] = gin.REQUIRED,
    dataset=gin.REQUIRED,
    views: Callable[..., Views] = gin.REQUIRED,
    trainer: Trainer | None = None,
    features: FrozenFeatures | None = None,
    evaluations: Sequence = (),
    seed: int = 0,
) -> dict:
    """Pretrains (unless already done for this pretraining id) and evaluates one run.

    Args:
        spec: the run's strings (ids, table, results root).
        method: the method's class, e.g. ``@simclr.SimCLR``; called as ``(backbone, data=DataInfo)``.
        dataset: e.g. ``@data.FashionMNIST()``.
        views: e.g. ``@views.Views``; called with the dataset's mean and std.
        trainer: e.g. ``@trainer.Trainer()``.
        features: which images the frozen-feature protocols see.
        evaluations: protocols with ``name`` and ``params()``, each ``(train, test) -> {metric: value}``
            on frozen features or, with ``frozen = False``, ``evaluate(ctx)`` (`harness.evals.protocol`).
        seed: the run's seed (initialisation, data order, augmentations).
    Returns:
        The run record written to run.json (or found there, when another process finished it).
    """
    trainer, features = trainer or Trainer(), features or FrozenFeatures()
    pre_dir = store.pretrain_dir(spec.results, spec.pretrain_id)
    if trainer_lib.distributed()[0] > 0:  # data-parallel helper rank: pretraining only, no records
        if store.pretrain_problems(pre_dir):
            pretrain(pre_dir, method, dataset, views, trainer, seed)
        return {}
    out_dir = store.run_dir(spec.results, spec.table, spec.run_id)
    try:
        with store.owned(out_dir):  # one live process per run: a second sweep finds it busy
            store.clean_stale_temps(out_dir)
            if not store.run_problems(out_dir):  # finished by another sweep meanwhile
                print(f"run {spec.run_id} already done", flush=True)
                return cast(dict, store.read_json(out_dir / "run.json"))  # checked: no problems
            record = _run(spec, out_dir, pre_dir, method, dataset, views, trainer, features, evaluations, seed)
            return cast(dict, record)  # a RunRecord is a dict
    except store.Busy:
        print(f"run {spec.run_id} is being run by another process (its lock is held): not running it twice", flush=True)
        return {}


def _run(
    spec: RunSpec,
    out_dir: Path,
    pre_dir: Path,
    method: Callable[..., Method],
    dataset,
    views: Callable[..., Views],
    trainer: Trainer,
    features: FrozenFeatures,
    evaluations: Sequence,
    seed: int,
) -> store.RunRecord:
    root = Path(spec.results)
    record: store.RunRecord = {
        "run_id": spec.run_id,
        "pretrain_id": spec.pretrain_id,
        "table": spec.table,
        "method": spec.method,
        "seed": seed,
        "swept": dict(spec.swept),
        "status": store.Status.RUNNING.value,
        "metrics": {},
        "protocols": {},
        "timings": {},
        "artefacts": {},
        "warnings": [],
        "git": store.git_revision(),
        "error": None,
        "log": _log_path(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": store.now(),
        "finished": None,
    }
    store.write_json(out_dir / "run.json", record)
    try:
        pre = _pretrained(pre_dir, method, dataset, views, trainer, seed, spec.pretrain_id)
        t0, cpu0 = time.time(), time.process_time()
        enc = encoder_for_eval(pre_dir, method, dataset.split("test"), pre)
        feats = features(enc, dataset, pre_dir / "features", trainer.device, trainer.progress)
        record["conditions"] = conditions(dataset, enc, features, trainer)
        record["warnings"] = data_lib.warnings_for(dataset.split("train"))
        for w in record["warnings"]:
            print(f"warning: {w}", flush=True)
        ctx = Context(
            encoder=lambda: encoder_for_eval(pre_dir, method, dataset.split("test"), pre),
            dataset=dataset,
            pretrain_dir=pre_dir,
            features=feats,
            device=trainer.device,
            seed=seed,
            progress=trainer.progress,
        )
        protocol_lib.check_names(evaluations)
        for protocol in evaluations:  # each number is stored with its protocol's name, id and settings
            p0, pcpu0 = time.time(), time.process_time()
            try:
                metrics = protocol_lib.evaluate(protocol, ctx)
            except Unsupported as err:  # this protocol cannot read this encoder (detection on a ViT): the rest can
                record["protocols"][protocol.name] = {
                    **protocol_lib.describe(protocol, {}),
                    "skipped": str(err).splitlines()[0],
                }
                print(f"protocol {protocol.name} skipped: {err}", flush=True)
                continue
            record["metrics"].update(metrics)
            record["protocols"][protocol.name] = protocol_lib.describe(protocol, metrics)
            record["timings"].setdefault("protocols", {})[protocol.name] = {  # where the evaluation time goes
                "s": round(time.time() - p0, 2),
                "cpu_s": round(time.process_time() - pcpu0, 2),
            }
        record["timings"] |= {
            "pretrain_s": round(pre["seconds"], 2),
            "eval_s": round(time.time() - t0, 2),
            "pretrain_cpu_s": round(pre["cpu_seconds"], 2) if "cpu_seconds" in pre else None,
            "eval_cpu_s": round(time.process_time() - cpu0, 2),
        }
        # What the numbers depend on, relative to the results root: checked before the run counts as done.
        rel = pre_dir.relative_to(root)
        record["artefacts"] = {
            **{f"{rel}/{name}": meta for name, meta in pre["artefacts"].items()},
            **{str(p.relative_to(root)): meta for p, meta in getattr(features, "used", {}).items()},
        }
        record.update({"status": store.Status.DONE.value, "finished": store.now()})
        with contextlib.closing(Curves(out_dir, getattr(trainer, "tensorboard", True))) as curves:
            numbers = {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float))}
            curves.add(int(pre.get("steps", 0)), numbers, "eval")  # at the pretraining's last step
        store.write_text(out_dir / "config.gin", gin.operative_config_str())
        store.write_json(out_dir / "run.json", record)
        return record
    except Unsupported as err:  # e.g. a colour-only method on grayscale data: a reason, not a failure
        record.update(
            {"status": store.Status.SKIPPED.value, "error": str(err).splitlines()[0], "finished": store.now()}
        )
        store.write_json(out_dir / "run.json", record)
        print(f"skipped {spec.method}: {err}", flush=True)
        return record
    except SystemExit:  # submitit requeues a preempted or timed-out job by exiting it
        record.update({"status": store.Status.REQUEUED.value, "finished": store.now()})
        store.write_json(out_dir / "run.json", record)
        raise
    except KeyboardInterrupt:  # SIGINT (the sweep stopped, submitit cancelled the job, Ctrl-C) or SIGTERM
        record.update(
            {
                "status": store.Status.INTERRUPTED.value,
                "error": "interrupted: the process was stopped by a signal",
                "finished": store.now(),
            }
        )
        store.write_json(out_dir / "run.json", record)
        raise
    except BaseException as err:
        record.update(
            {
                "status": store.Status.FAILED.value,
                "error": f"{type(err).__name__}: {err}",
                "finished": store.now(),
                "traceback": traceback.format_exc(),
            }
        )
        store.write_json(out_dir / "run.json", record)
        raise


def init_distributed() -> None:
    """Joins the job's tasks into one process group when submitit started several."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not a submitit job
        return
    if env.num_tasks > 1 and not torch.distributed.is_initialized():
        submitit.helpers.TorchDistributedEnvironment().export()
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def execute(spec: RunSpec) -> dict:
    """Entry point in a job process: parse the spec's gin, check its ids, join the job's
    other tasks (data parallel), run."""
    ginutil.parse(spec.gin_files, spec.bindings)
    ids = ginutil.ids()
    if ids != (spec.pretrain_id, spec.run_id):
        raise RuntimeError(
            f"run {spec.run_id}: its settings resolve to ids {ids} now, not the ids planned by the "
            "sweep (a gin file or the code changed since); run the sweep again"
        )
    init_distributed()
    return run(spec)
