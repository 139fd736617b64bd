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
        combinations: instead of `sweep`'s every combination, these ones only: a list of
            ``{key: value}`` with the same keys (a paper that printed 128/200, 512/200 and
            512/800 batch/epochs, not 128/800).
        method_bindings: method -> gin bindings for its runs alone, after the table's files and
            before ``--bind`` (a paper's schedule for one of its rows: SimCLR's 1000 epochs).
    """

    def __init__(
        self,
        methods: Sequence[str] = gin.REQUIRED,
        seeds: Sequence[int] = (0, 1),
        sweep: Mapping[str, Sequence[Any]] | None = None,
        name: str | None = None,
        scale: str = "embedded",
        combinations: Sequence[Mapping[str, Any]] | None = None,
        method_bindings: Mapping[str, Sequence[str]] | None = None,
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
        self.combinations = [dict(c) for c in combinations or []]
        if self.combinations:
            keys = sorted(self.combinations[0])
            if self.sweep or any(sorted(c) != keys for c in self.combinations):
                raise ValueError(
                    "table.Table.combinations: every combination needs the same keys, and sweep must be unbound "
                    f"beside it (got sweep {self.sweep or 'unbound'}, combinations {self.combinations})"
                )
            self.sweep = {k: list(dict.fromkeys(c[k] for c in self.combinations)) for k in keys}
        self.method_bindings = {m: [str(b) for b in binds] for m, binds in (method_bindings or {}).items()}
        if stray := sorted(set(self.method_bindings) - set(self.methods)):
            raise ValueError(
                f"table.Table.method_bindings names {', '.join(stray)}, not in table.Table.methods "
                f"({', '.join(self.methods)}). Fix: correct the name or add the method"
            )
        for k, v in self.sweep.items():
            if "." not in k or not v:
                raise ValueError(
                    f"table.Table.sweep: {k!r} needs a 'configurable.param' key and a non-empty list of values"
                )

    def points(self) -> Iterator[tuple[tuple[str, str], ...]]:
        """Every combination of swept values, as ``((key, gin literal), ...)``."""
        keys = sorted(self.sweep)
        if self.combinations:
            for c in self.combinations:
                yield tuple((k, repr(c[k])) for k in keys)
            return
        for values in itertools.product(*(self.sweep[k] for k in keys)):
            yield tuple((k, repr(v)) for k, v in zip(keys, values))
