"""The results store: per-run folders, atomic writes, and where everything lives.

Layout under a results root (default ``results/``)::

    <root>/<table>/runs/<run_id>/run.json     # metrics, status, timings, error
    <root>/<table>/runs/<run_id>/config.gin   # the operative gin config that ran
    <root>/<table>/leaderboard.{csv,md,png}   # written by harness.collate
    <root>/pretrain/<pretrain_id>/            # shared by every table of this root
        checkpoint.pt  encoder.pt  encoder.json  pretrain.json  config.gin
        log.jsonl  features/<key>.pt
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_dir(root: str | Path, table: str, run_id: str) -> Path:
    return Path(root) / table / "runs" / run_id


def pretrain_dir(root: str | Path, pretrain_id: str) -> Path:
    return Path(root) / "pretrain" / pretrain_id


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_revision() -> str:
    """Short git revision of the harness, with ``+dirty`` when it has local edits."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temp path beside `path`; renames it over `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> dict | None:
    """The JSON object at `path`, or None when missing or torn."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save_torch(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: Path) -> Any:
    """Loads a checkpoint written by this harness (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def is_done(path: Path) -> bool:
    rec = read_json(path)
    return bool(rec) and rec.get("status") == "done"


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` across processes (two tables pretraining the same id)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
