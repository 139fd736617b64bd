"""A table: which methods, seeds and swept settings a gin file asks for.

A table gin file binds ``table.Table`` (the grid) and ``job.run`` (what every run
evaluates); `harness.sweep` expands the grid into RunSpecs.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Mapping, Sequence

import gin


@gin.configurable(module="table")
class Table:
    """The grid of a table.

    Args:
        methods: method names (file stems of ``gin/methods/*.gin``), in display order.
        seeds: one run per seed (at least two, so the leaderboard has a spread).
        sweep: gin keys to values, e.g. ``{"trainer.Trainer.epochs": [10, 20]}``; every
            combination is run.
        name: the table's name (results folder); defaults to the first gin file's stem.
        scale: the scale its runs are parsed at: ``gin/scale/<scale>.gin``, then the method's
            ``gin/scale/<scale>/<method>.gin`` when it exists, both after the method's paper
            settings and before the table's files (`harness.ginutil.run_files`).
    """

    def __init__(
        self,
        methods: Sequence[str] = gin.REQUIRED,
        seeds: Sequence[int] = (0, 1),
        sweep: Mapping[str, Sequence[Any]] | None = None,
        name: str | None = None,
        scale: str = "embedded",
    ):
        if isinstance(methods, str) or not methods:
            raise ValueError("table.Table.methods must be a non-empty list of method names, e.g. ['simclr']")
        if isinstance(seeds, (str, int)) or not seeds:
            raise ValueError(
                f"table.Table.seeds = {seeds!r}: a table needs at least one seed. Fix: bind "
                "table.Table.seeds = [0, 1] (or [0])"
            )
        if len(set(seeds)) != len(seeds):
            raise ValueError(
                f"table.Table.seeds = {list(seeds)!r} repeats a seed; each seed is one run. Fix: list each seed once"
            )
        self.methods, self.seeds, self.scale = list(methods), [int(s) for s in seeds], scale
        self.name: str = name or ""  # "": the sweep names it after its first gin file
        self.sweep = {k: list(v) for k, v in (sweep or {}).items()}
        for k, v in self.sweep.items():
            if "." not in k or not v:
                raise ValueError(
                    f"table.Table.sweep: {k!r} needs a 'configurable.param' key and a non-empty list of values"
                )

    def points(self) -> Iterator[tuple[tuple[str, str], ...]]:
        """Every combination of swept values, as ``((key, gin literal), ...)``."""
        keys = sorted(self.sweep)
        for values in itertools.product(*(self.sweep[k] for k in keys)):
            yield tuple((k, repr(v)) for k, v in zip(keys, values))
