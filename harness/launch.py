"""Launchers: submitit runs each RunSpec as its own process, locally or on SLURM.

``launch.Local`` (``gin/launch/local.gin``, the default) runs jobs as local processes
through submitit's LocalExecutor, `parallel` at a time, echoing each job's output.
``launch.InProcess`` (``gin/launch/inprocess.gin``) runs them in the sweep's process.
``launch.Slurm`` (``gin/launch/slurm.gin``) submits them as one SLURM job array and
leaves a ``queued.json`` marker (job id) in each run folder.

Jobs are ``submitit.helpers.Checkpointable``: on preemption or timeout (SIGUSR2) the
trainer saves a checkpoint at the next step boundary, submitit requeues the job, and
the new attempt resumes from that checkpoint. The store, not the scheduler, says what
is done: ``run.json`` files, plus ``squeue`` for what is queued.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence, cast

import submitit
from submitit.local.local import LocalJob

import gin
from harness import job, store, trainer
from harness.runspec import RunSpec


class Job(submitit.helpers.Checkpointable):
    """The callable submitit pickles: it receives only the RunSpec's JSON string."""

    def __call__(self, spec_json: str) -> dict:
        # A sweep started in the background of a non-interactive shell passes SIGINT on as
        # ignored; the job must still stop (and record itself interrupted) when cancelled.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sig = submitit.JobEnvironment._usr_sig()  # noqa: SLF001 - the signal submitit preempts with
        handler = cast("Callable[[int, object], None]", signal.getsignal(sig))  # the handler submitit installed
        signal.signal(sig, trainer.defer_while_training(handler))
        return job.execute(RunSpec.from_json(spec_json))


def _echo(paths: Sequence[Path], offsets: dict[Path, int]) -> None:
    for p in paths:
        if p.exists():
            with open(p, "rb") as fh:
                fh.seek(offsets.get(p, 0))
                chunk = fh.read()
            offsets[p] = offsets.get(p, 0) + len(chunk)
            if chunk:
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()


@gin.configurable(module="launch")
def chosen(launcher: object | None = None) -> object:
    """The launcher chosen by ``gin/launch/*.gin`` (``launch.chosen.launcher``); local by default."""
    return launcher or Local()


@gin.configurable(module="launch")
class InProcess:
    """Runs every spec one after another inside the sweep's own process (like submitit's
    debug executor): no process start per run, and a debugger or profiler sees the run.
    For tests, quick smoke tables and debugging (``gin/launch/inprocess.gin``); no
    preemption handling, and a crash of one run can take the sweep down.
    """

    def launch(self, specs: Sequence[RunSpec], folder: Path) -> list[tuple[RunSpec, Exception | None]]:
        """Runs every spec; returns each with the exception it raised, or None."""
        results: list[tuple[RunSpec, Exception | None]] = []
        for i, spec in enumerate(specs, 1):
            print(
                f"\n=== [{i}/{len(specs)}] {spec.method} seed={spec.seed} {dict(spec.swept) or ''} "
                f"run {spec.run_id} (in process)",
                file=sys.stderr,
                flush=True,
            )
            try:
                job.execute(spec)
                results.append((spec, None))
            except Exception as err:  # noqa: BLE001 - recorded in run.json; the sweep reports it
                results.append((spec, err))
        return results


@gin.configurable(module="launch")
class Local:
    """Local processes via submitit's LocalExecutor.

    Args:
        parallel: jobs running at once (on a 2-core laptop, 1 is fastest); with more than
            one, each job gets ``cpu_count // parallel`` torch threads.
        timeout_min: per-job time limit in minutes.
        echo: copy each job's output (progress bars included) to this terminal.
    """

    def __init__(self, parallel: int = 1, timeout_min: int = 24 * 60, echo: bool = True):
        self.parallel, self.timeout_min, self.echo = parallel, timeout_min, echo

    def launch(self, specs: Sequence[RunSpec], folder: Path) -> list[tuple[RunSpec, Exception | None]]:
        """Runs every spec; returns each with the exception it raised, or None."""
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=self.timeout_min)
        if self.parallel > 1:  # share the cores: oversubscribed torch threads run many times slower
            threads = max(1, (os.cpu_count() or 1) // self.parallel)
            executor.update_parameters(setup=[f"export OMP_NUM_THREADS={threads}"])
        results: list[tuple[RunSpec, Exception | None]] = []
        pending = list(specs)
        running: list[tuple[RunSpec, LocalJob]] = []
        offsets: dict[Path, int] = {}
        echo = self.echo and self.parallel == 1
        try:
            while pending or running:
                while pending and len(running) < self.parallel:
                    spec = pending.pop(0)
                    print(
                        f"\n=== [{len(specs) - len(pending)}/{len(specs)}] {spec.method} seed={spec.seed} "
                        f"{dict(spec.swept) or ''} run {spec.run_id}",
                        file=sys.stderr,
                        flush=True,
                    )
                    running.append((spec, cast(LocalJob, executor.submit(Job(), spec.to_json()))))  # a local executor's
                time.sleep(0.5)
                for spec, j in list(running):
                    finished = j.done()  # read before echoing, so the last output is echoed too
                    if echo:
                        _echo([j.paths.stdout, j.paths.stderr], offsets)
                    if finished:
                        running.remove((spec, j))
                        err = j.exception()
                        if err is not None:  # a job killed without a word leaves its record 'running'
                            mark_interrupted(spec, died_reason(err))
                        results.append((spec, err))
        except KeyboardInterrupt:
            for _, j in running:  # local jobs must not outlive the sweep that started them
                _signal_job(j, signal.SIGINT)  # each task records itself as interrupted
            deadline = time.monotonic() + 15
            while any(not j.done() for _, j in running) and time.monotonic() < deadline:
                time.sleep(0.2)
            for _, j in running:  # a job that did not stop (submitit's tasks ignore SIGTERM): killed
                if not j.done():
                    _signal_job(j, signal.SIGKILL)
                    cast("subprocess.Popen", j._process).wait(timeout=10)  # noqa: SLF001 - submitit keeps the Popen there
            for spec, _ in running:
                mark_interrupted(spec, "interrupted: the sweep was stopped (SIGINT or SIGTERM)")
            raise
        return results


def _signal_job(job: LocalJob, signum: int) -> None:
    """Sends `signum` to a local job's controller and every process below it (submitit's
    controller forwards no SIGINT when it inherited SIGINT ignored, e.g. from `sweep &`), and
    for SIGKILL waits until they are gone, so their locks are free."""
    proc = job._process  # noqa: SLF001 - submitit's LocalJob keeps its Popen here
    if proc is None:
        return
    pids = [*_descendants(proc.pid), proc.pid]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    deadline = time.monotonic() + 10
    while signum == signal.SIGKILL and time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has released its locks)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return store.pid_alive(pid) if not Path("/proc").is_dir() else False


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first; empty where /proc is absent."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


_PROGRESS = re.compile(r"(\d+%\|)|(\d+(\.\d+)?(it/s|s/it)\])|(^\s*[\w/]+:\s+\d+%)")


def died_reason(err: BaseException) -> str:
    """The last real error line of a job that ended abnormally (progress bars left out),
    or "killed" when it printed none (SIGKILL, out of memory)."""
    lines = [ln.strip() for ln in str(err).replace("\r", "\n").splitlines() if ln.strip()]
    real = [ln for ln in lines if not _PROGRESS.search(ln) and not ln.startswith(("----", "Error stream"))]
    errors = [ln for ln in real if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", ln)]
    if errors:
        return errors[-1][:300]
    return "killed: the job's process ended without an error (a signal such as SIGKILL, or out of memory)"


def mark_interrupted(spec: RunSpec, reason: str) -> None:
    """Records a run whose process is gone while its run.json still says running as
    ``interrupted`` with `reason` (the process's lock is free, so nobody else owns it)."""
    folder = store.run_dir(spec.results, spec.table, spec.run_id)
    rec = store.read_json(folder / "run.json")
    if rec is not None and rec.get("status") == store.Status.RUNNING and not store.is_locked(folder):
        rec.update(status=store.Status.INTERRUPTED.value, error=reason, finished=store.now())
        store.write_json(folder / "run.json", rec)


class LaunchError(RuntimeError):
    """The chosen launcher cannot run here; the message says what to use instead."""


def squeue_states() -> dict[str, str] | None:
    """``{job id: state}`` of this user's SLURM jobs (array tasks one per line); None without SLURM."""
    exe = shutil.which("squeue")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-h", "-r", "--me", "-o", "%i|%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


def marker_path(spec: RunSpec) -> Path:
    return store.run_dir(spec.results, spec.table, spec.run_id) / "queued.json"


@gin.configurable(module="launch")
class Slurm:
    """A SLURM job array through submitit; one task per RunSpec, each receiving only its strings.

    Args:
        partition: ``--partition``.
        time_min: per-job time limit in minutes (a job past it is requeued and resumes).
        gpus_per_node: GPUs per node of a job.
        cpus_per_task: CPUs per task.
        mem_gb: memory per job.
        tasks_per_node: processes per node (DDP ranks); None: one per GPU (at least one).
        nodes: nodes per job: a run's DDP spans ``nodes x tasks_per_node`` ranks.
        array_parallelism: tasks of the array running at once.
        account: ``--account``.
        qos: ``--qos``.
        constraint: ``--constraint``.
        additional: further sbatch options, e.g. ``{"reservation": "x"}``.
        max_num_timeout: requeues after time-outs or preemptions before giving up.
        wait: block until every job has finished (tests, small clusters).
        poll_s: seconds between checks when waiting.
    """

    def __init__(
        self,
        partition: str | None = None,
        time_min: int = 24 * 60,
        gpus_per_node: int = 0,
        cpus_per_task: int = 8,
        mem_gb: float | None = None,
        tasks_per_node: int | None = None,
        nodes: int = 1,
        array_parallelism: int = 64,
        account: str | None = None,
        qos: str | None = None,
        constraint: str | None = None,
        additional: dict | None = None,
        max_num_timeout: int = 10,
        wait: bool = False,
        poll_s: float = 5.0,
    ):
        self.wait, self.poll_s, self.max_num_timeout = wait, poll_s, max_num_timeout
        self.params = {
            "timeout_min": time_min,
            "gpus_per_node": gpus_per_node,
            "cpus_per_task": cpus_per_task,
            "tasks_per_node": max(1, gpus_per_node) if tasks_per_node is None else tasks_per_node,
            "nodes": nodes,
            "mem_gb": mem_gb,
            "slurm_array_parallelism": array_parallelism,
            "slurm_partition": partition,
            "slurm_account": account,
            "slurm_qos": qos,
            "slurm_constraint": constraint,
            "slurm_additional_parameters": additional,
        }

    def check(self) -> None:
        if shutil.which("sbatch") is None:
            raise LaunchError(
                "sbatch not found on PATH: gin/launch/slurm.gin submits to a SLURM cluster. Run the "
                "sweep on a cluster's login node, or use local processes (drop gin/launch/slurm.gin, "
                "or give gin/launch/local.gin after it)"
            )

    def launch(self, specs: Sequence[RunSpec], folder: Path) -> list[tuple[RunSpec, Exception | None]]:
        """Submits every spec as one job array; returns outcomes only when `wait` is set."""
        self.check()
        executor = submitit.AutoExecutor(
            folder=str(folder), cluster="slurm", slurm_max_num_timeout=self.max_num_timeout
        )
        executor.update_parameters(**{k: v for k, v in self.params.items() if v is not None})
        folder.mkdir(parents=True, exist_ok=True)
        before = set(folder.rglob("*"))
        try:
            jobs = executor.map_array(Job(), [s.to_json() for s in specs])
        except (submitit.core.utils.FailedJobError, subprocess.SubprocessError, OSError) as err:
            for leftover in sorted(set(folder.rglob("*")) - before, reverse=True):  # this submission's files
                leftover.rmdir() if leftover.is_dir() else leftover.unlink(missing_ok=True)
            said = [ln.strip() for ln in str(err).splitlines() if "sbatch: error" in ln or "error:" in ln.lower()]
            raise LaunchError(
                f"sbatch refused the job array: {(said or [str(err).strip()])[-1][:300]}. Nothing was "
                "submitted. Fix: the resources in gin/launch/slurm.gin or --bind 'launch.Slurm.<key> = "
                "...' (partition, account, qos, time_min, gpus_per_node; see `sinfo`)"
            ) from err
        for spec, j in zip(specs, jobs):
            store.write_json(
                marker_path(spec),
                {"job_id": j.job_id, "launcher": "slurm", "submitted": store.now(), "log": str(j.paths.stdout)},
            )
        print(f"submitted {len(jobs)} runs as SLURM job array {jobs[0].job_id.split('_')[0]}", file=sys.stderr)
        return wait_for(specs, self.poll_s) if self.wait else []


def wait_for(specs: Sequence[RunSpec], poll_s: float) -> list[tuple[RunSpec, Exception | None]]:
    """Polls run.json files and squeue until every spec is done, failed, or gone from the queue."""
    results: list[tuple[RunSpec, Exception | None]] = []
    pending = list(specs)
    while pending:
        time.sleep(poll_s)
        queued = squeue_states() or {}
        for spec in list(pending):
            folder = marker_path(spec).parent
            status, reason = store.effective_status(folder) if (folder / "run.json").exists() else (None, "")
            job_id = (store.read_json(marker_path(spec)) or {}).get("job_id")
            if status in (store.Status.DONE, store.Status.SKIPPED):
                results.append((spec, None))
            elif status == store.Status.FAILED or job_id not in queued:
                results.append((spec, RuntimeError(reason or f"job {job_id} left the queue unfinished")))
            else:
                continue
            pending.remove(spec)
    return results
