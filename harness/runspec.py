"""RunSpec: the unit of work, plain strings only, so it crosses process boundaries.

A job parses gin itself from these strings (gin state does not cross processes).
"""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One (method, seed, swept point) of a table.

    Attributes:
        table: the table name; runs land in ``<results>/<table>/runs/<run_id>/``.
        method: the method's file stem (``simclr``).
        seed: the run's seed.
        gin_files: parsed in order, later ones overriding earlier ones.
        bindings: parsed after the files, in order.
        results: the results root folder.
        swept: the swept keys as bound, ``{"trainer.Trainer.epochs": "10"}``.
        run_id: stable hash of the resolved settings (see `harness.ginutil.ids`).
        pretrain_id: stable hash of the settings that change pretraining.
    """

    table: str
    method: str
    seed: int
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]
    results: str
    swept: tuple[tuple[str, str], ...] = ()
    run_id: str = ""
    pretrain_id: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        d = json.loads(text)
        d["gin_files"], d["bindings"] = tuple(d["gin_files"]), tuple(d["bindings"])
        d["swept"] = tuple(tuple(kv) for kv in d["swept"])
        return cls(**d)
