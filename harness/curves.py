"""TensorBoard copies of a run's curves and numbers, for runs that last days: ``tensorboard --logdir results/``.

The records stay log.jsonl (each pretraining step's loss terms and lr) and run.json (the metrics); these
event files are views of them, written by rank 0 only: pretraining curves under
``<pretrain dir>/tensorboard/`` (``pretrain/<term>``), evaluation metrics under ``<run dir>/tensorboard/``
(``eval/<metric>``, at the pretraining's last step). After a resume, events at or after the resumed step
are purged, as log.jsonl drops the records of steps that run again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


class Curves:
    """Scalars into ``folder/tensorboard``; the writer (and TensorBoard's import) is made on the first `add`.

    Args:
        folder: the run's or the pretraining's folder.
        enabled: False writes nothing (``trainer.Trainer.tensorboard = False``).
        purge_from: a resumed run's first step: earlier files' events from it on are dropped.
    """

    def __init__(self, folder: Path, enabled: bool = True, purge_from: int | None = None):
        self.folder, self.enabled, self.purge_from = Path(folder) / "tensorboard", enabled, purge_from
        self._writer: Any = None

    def add(self, step: int, values: Mapping[str, float], prefix: str) -> None:
        """``prefix/name`` = value at `step`, for each entry of `values`."""
        if not self.enabled:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder), purge_step=self.purge_from)
        for name, value in values.items():
            self._writer.add_scalar(f"{prefix}/{name}", float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``folder/tensorboard``: ``{tag: [(step, value), ...]}`` (tests, notebooks)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(folder) / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
