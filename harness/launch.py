"""Launchers: submitit runs each RunSpec as its own process, locally or on SLURM.

``launch.Local`` (``gin/launch/local.gin``, the default) runs jobs as local processes
through submitit's LocalExecutor, `parallel` at a time, echoing each job's output.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Sequence

import gin
import submitit

from harness import job
from harness.runspec import RunSpec


class Job(submitit.helpers.Checkpointable):
    """The callable submitit pickles: it receives only the RunSpec's JSON string."""

    def __call__(self, spec_json: str) -> dict:
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
        results, pending = [], list(specs)
        running: list[tuple[RunSpec, submitit.Job]] = []
        offsets: dict[Path, int] = {}
        echo = self.echo and self.parallel == 1
        try:
            while pending or running:
                while pending and len(running) < self.parallel:
                    spec = pending.pop(0)
                    print(f"\n=== [{len(specs) - len(pending)}/{len(specs)}] {spec.method} seed={spec.seed} "
                          f"{dict(spec.swept) or ''} run {spec.run_id}", file=sys.stderr, flush=True)
                    running.append((spec, executor.submit(Job(), spec.to_json())))
                time.sleep(0.5)
                for spec, j in list(running):
                    finished = j.done()  # read before echoing, so the last output is echoed too
                    if echo:
                        _echo([j.paths.stdout, j.paths.stderr], offsets)
                    if finished:
                        running.remove((spec, j))
                        results.append((spec, j.exception()))
        except KeyboardInterrupt:
            for _, j in running:  # local jobs must not outlive the sweep that started them
                j.cancel(check=False)
            raise
        return results
