"""What every evaluation protocol shares: a name, its settings, and an id that hashes both.

A protocol is any object with

* ``name`` — which protocol, e.g. ``linear/mocov2`` (the paper whose recipe it follows);
* ``params()`` — every setting that can change its numbers, JSON-serialisable;
* either ``__call__(train, test) -> {metric: value}`` on frozen features (the default), or
  ``frozen = False`` and ``evaluate(ctx) -> {metric: value}`` (`harness.evals.Context`:
  protocols that fine-tune the encoder or read other data);
* optionally ``selected``: choices made while evaluating (the l2 a probe chose, the
  subset it drew), recorded beside the numbers but not hashed.

`protocol_id` hashes (name, params): two numbers with the same id were made by the same
protocol with the same settings. run.json records it with each protocol's metrics, and
the leaderboard never averages numbers of different ids (`harness.collate`).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from harness.evals import Context

ID_LENGTH = 8  # hex digits: a collision among a table's handful of protocol settings is negligible


def params_of(protocol: Any) -> dict:
    """The protocol's settings as they will be stored (a JSON round trip: tuples become lists)."""
    return json.loads(json.dumps(protocol.params(), sort_keys=True))


def protocol_id(protocol: Any) -> str:
    """A short stable hash of the protocol's name and settings."""
    blob = json.dumps({"name": protocol.name, "params": params_of(protocol)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:ID_LENGTH]


def check_names(protocols: Sequence[Any]) -> None:
    """Raises if two protocols of one run share a name (their records would overwrite each other)."""
    names = [p.name for p in protocols]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"job.run.evaluations lists more than one protocol named {', '.join(twice)}; give each its "
            "own name (e.g. bind `<scope>/linear.PaperProbe.name`) or drop the duplicate"
        )


def evaluate(protocol: Any, ctx: Context) -> dict[str, float]:
    """Runs one protocol: on the shared frozen features, or on the context when it needs more."""
    if getattr(protocol, "frozen", True):
        return protocol(ctx.features["train"], ctx.features["test"])
    return protocol.evaluate(ctx)


def describe(protocol: Any, metrics: dict[str, float]) -> dict:
    """The run.json record of one protocol: ``{"id", "params", "metrics", "selected"?}``."""
    out = {"id": protocol_id(protocol), "params": params_of(protocol), "metrics": sorted(metrics)}
    if getattr(protocol, "selected", None):
        out["selected"] = protocol.selected
    return out


def budget_lines(protocols: Sequence[Any], train: Any) -> list[str]:
    """One line per protocol that trains (has ``budget(train)``): its optimizer steps, batch
    and images seen on the training split `train`, computed from its settings as it will run."""
    lines = []
    for protocol in protocols:
        if not hasattr(protocol, "budget"):
            continue
        parts = protocol.budget(train)
        text = "; ".join(
            f"{tag + ': ' if tag else ''}{b['steps']:,} steps x {b['batch']} ({b['images_seen']:,} images)"
            for tag, b in parts.items()
        )
        lines.append(f"{protocol.name}: {text}")
    return lines
