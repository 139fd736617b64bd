"""The results store: per-run folders, atomic writes, checked artefacts, and where everything lives.

Layout under a results root (default ``results/``)::

    <root>/<table>/runs/<run_id>/run.json     # metrics, status, timings, error, artefacts
    <root>/<table>/runs/<run_id>/config.gin   # the operative gin config that ran
    <root>/<table>/leaderboard.{csv,md,png}   # written by harness.collate
    <root>/pretrain/<pretrain_id>/            # shared by every table of this root
        checkpoint.pt  encoder.pt  encoder.json  pretrain.json  config.gin
        log.jsonl  features/<key>.pt  features/<key>.pt.json

Trust (README, "Reliability"): a stored result is used only after it is checked.
``pretrain.json`` lists the files it exported with their size and SHA-256
(`file_meta`), ``run.json`` lists every file its numbers depend on, and a cache file
(features) carries a ``.json`` sidecar with its own. A record that is incomplete, or
whose files are missing or differ in size, is not done: the sweep runs it again, which
rebuilds what is missing (re-exports the encoder from the final checkpoint, or
re-pretrains; re-extracts features). A file whose SHA-256 differs when it is loaded
stops the run with its path and the fix. Nothing is ever evaluated on a substitute.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, TypedDict, cast

REPO_ROOT = Path(__file__).resolve().parent.parent
_HOST = socket.gethostname().replace(".", "_").replace("@", "_")


class Status(str, enum.Enum):
    """A run's ``status`` in run.json (stored as the plain string)."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # the method refused the data (colour-only on grayscale): a reason, not a failure
    REQUEUED = "requeued"  # preempted or timed out on SLURM; a new attempt resumes it
    INTERRUPTED = "interrupted"  # the process was stopped (signal) or died; the sweep runs it again
    INVALID = "invalid"  # never stored: a record that failed its checks (shown by collate and --status)

    def __str__(self) -> str:  # the plain string, as stored (Python < 3.11's StrEnum)
        return self.value


class RunRecord(TypedDict, total=False):
    """``run.json``: what one run stored. `run_problems` checks the fields marked (checked)."""

    run_id: str  # (checked) its folder's name
    pretrain_id: str  # (checked) the pretraining it evaluated: <root>/pretrain/<pretrain_id>/
    table: str  # (checked)
    method: str  # (checked)
    seed: int  # (checked)
    status: str  # (checked) a `Status` value
    metrics: dict[str, float]  # (checked) {"linear/top1": 83.8, ...}
    protocols: dict[str, dict]  # (checked) per protocol: id, params, metrics (or skipped)
    timings: dict[str, Any]  # (checked) pretrain_s, eval_s, their CPU seconds, per protocol
    artefacts: dict[str, dict]  # (checked) {path under the root: file_meta}, what the numbers depend on
    swept: dict[str, str]
    conditions: dict[str, Any]  # dataset, backbone, image_size, pretrain_epochs, batch_size (`harness.published`)
    warnings: list[str]
    error: str | None
    traceback: str
    git: str
    log: str | None
    host: str
    pid: int
    started: str
    finished: str | None


class StoreError(RuntimeError):
    """A stored file that cannot be trusted; the message names it and the fix."""


def run_dir(root: str | Path, table: str, run_id: str) -> Path:
    return Path(root) / table / "runs" / run_id


def pretrain_dir(root: str | Path, pretrain_id: str) -> Path:
    return Path(root) / "pretrain" / pretrain_id


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_revision() -> str:
    """Short git revision of the harness, with ``+dirty`` when it has local edits."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- atomic writes and their leftovers -------------------------------------------------------

_TMP = re.compile(r"^\..+\.(\d+)@([^.]+)\.[^.]+\.tmp$")  # .<name>.<pid>@<host>.<random>.tmp


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temp path beside `path`; renames it over `path` only if the block succeeds.

    The temp file's name holds the writer's pid and host, so that `clean_stale_temps` can
    remove what a killed writer left without touching a live writer's file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{_HOST}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: Path) -> list[Path]:
    """Removes temp files in `folder` (and its ``features/``) left by killed writers on this
    host (their pid is gone); returns them. Files of live writers and other hosts stay."""
    removed = []
    for d in (folder, folder / "features"):
        for f in d.glob(".*.tmp") if d.is_dir() else []:
            m = _TMP.match(f.name)
            if m and m.group(2) == _HOST and not pid_alive(int(m.group(1))):
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> dict | None:
    """The JSON object at `path`, or None when missing, torn or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# --- checked files ---------------------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_meta(path: Path) -> dict:
    """``{"bytes": size, "sha256": hex}`` of a file, as recorded when it is written."""
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def file_problem(path: Path, meta: Any, full: bool = False) -> str | None:
    """None when `path` matches its recorded `meta`, else what is wrong. Without `full`
    only existence and size are checked (cheap, for listing a table); with it, the SHA-256."""
    if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
        return f"{path}: no valid size and checksum recorded"
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != meta["bytes"]:
        return f"{path}: {size} bytes, {meta['bytes']} recorded (truncated or replaced)"
    if full and sha256(path) != meta["sha256"]:
        return f"{path}: its SHA-256 differs from the recorded one (the file was changed or damaged)"
    return None


def artefact_problems(folder: Path, artefacts: Any, full: bool = False) -> list[str]:
    """Problems of the files `artefacts` (``{path relative to folder: meta}``) lists."""
    if not isinstance(artefacts, dict):
        return [f"{folder}: no artefact list recorded"]
    return [p for rel, meta in artefacts.items() if (p := file_problem(folder / rel, meta, full))]


def save_torch(path: Path, obj: Any) -> dict:
    """Writes `obj` atomically; returns the file's `file_meta`."""
    import torch  # lazily: the store is read by processes that never need torch (collate, tests)

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        meta = file_meta(tmp)
    return meta


def load_torch(path: Path, meta: dict | None = None, fix: str | None = None) -> Any:
    """Loads a file written by this harness (tensors and plain containers only: any other
    pickled object is refused, never unpickled). With `meta`, the file must match it first.

    Raises:
        StoreError: naming the file, what is wrong, and `fix` (default: delete the file).
    """
    import pickle

    import torch

    fix = fix or f"delete {path} and run again to rebuild it"
    if meta is not None and (problem := file_problem(path, meta, full=True)):
        raise StoreError(f"{problem}. Fix: {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise StoreError(
            f"{path}: holds pickled objects other than tensors and plain containers, which this "
            f"harness never unpickles (they could run code); it was not written by sslbench. "
            f"Fix: {fix}"
        ) from err
    except FileNotFoundError:
        raise
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        reason = str(err).strip().splitlines()[0].split(". ")[0][:160] if str(err).strip() else type(err).__name__
        raise StoreError(f"{path}: unreadable, truncated or damaged ({reason}). Fix: {fix}") from err


def save_cache(path: Path, obj: Any) -> dict:
    """Writes a cache file (features) with a ``<name>.json`` sidecar holding its `file_meta`."""
    meta = save_torch(path, obj)
    write_json(path.with_name(path.name + ".json"), meta)
    return meta


def load_cache(path: Path) -> tuple[Any, dict] | None:
    """``(object, meta)`` of a cache file that matches its sidecar; None when it is missing,
    has no sidecar, or does not match (the caller rebuilds it; a note says why)."""
    if not path.exists():
        return None
    meta = read_json(path.with_name(path.name + ".json"))
    problem = file_problem(path, meta, full=True) if meta else f"{path}: no checksum sidecar"
    if problem is None:
        try:
            return load_torch(path), cast(dict, meta)  # a dict: file_problem found none
        except StoreError as err:
            problem = str(err)
    print(f"cache {problem.split('. Fix:')[0]}: rebuilding it", flush=True)
    return None


# --- records -----------------------------------------------------------------------------------

_PRETRAIN_FIELDS = {"status": str, "steps": int, "seconds": (int, float), "artefacts": dict, "encoder": str}
_RUN_FIELDS = {
    "run_id": str,
    "pretrain_id": str,
    "table": str,
    "method": str,
    "seed": int,
    "status": str,
    "metrics": dict,
    "protocols": dict,
    "timings": dict,
    "artefacts": dict,
}  # RunRecord's (checked)


def _field_problems(rec: dict, fields: dict) -> list[str]:
    out = []
    for key, kind in fields.items():
        if key not in rec:
            out.append(f"no {key!r}")
        elif not isinstance(rec[key], kind) or isinstance(rec[key], bool):
            out.append(f"{key!r} is {type(rec[key]).__name__}")
    return out


def pretrain_problems(folder: Path, full: bool = False) -> list[str]:
    """Why ``folder/pretrain.json`` is not a finished, intact pretraining (empty: it is)."""
    rec = read_json(folder / "pretrain.json")
    if rec is None:
        return [f"{folder / 'pretrain.json'}: missing or unreadable"]
    bad = _field_problems(rec, _PRETRAIN_FIELDS)
    if bad or rec["status"] != Status.DONE:
        return [f"{folder / 'pretrain.json'}: incomplete record ({', '.join(bad) or 'status ' + repr(rec['status'])})"]
    return artefact_problems(folder, rec["artefacts"], full)


def run_problems(folder: Path, rec: dict | None = None, full: bool = False) -> list[str]:
    """Why ``folder/run.json`` is not a finished, intact run (empty: it is)."""
    path = folder / "run.json"
    rec = read_json(path) if rec is None else rec
    if rec is None:
        return [f"{path}: missing or unreadable"]
    bad = _field_problems(rec, _RUN_FIELDS)
    if bad:
        return [f"{path}: incomplete record ({', '.join(bad)})"]
    if rec["status"] != Status.DONE:
        return [f"{path}: status {rec['status']!r}"]
    if rec["run_id"] != folder.name:
        return [f"{path}: records run {rec['run_id']!r}, not its folder's {folder.name!r}"]
    root = folder.parent.parent.parent  # <root>/<table>/runs/<id>
    return artefact_problems(root, rec["artefacts"], full)


def effective_status(folder: Path, rec: dict | None = None) -> tuple[str, str]:
    """``(status, reason)`` of a run as it stands now, from its record and its lock.

    A ``done`` record that fails its checks is ``invalid``; a ``running`` one whose owner is
    gone (nobody holds the run's lock) is ``interrupted`` ("killed": the process died
    without saying why). Other statuses are as recorded.
    """
    rec = read_json(folder / "run.json") if rec is None else rec
    if rec is None:
        return Status.INVALID.value, f"{folder / 'run.json'}: missing or unreadable"
    status = rec.get("status")
    if status == Status.DONE:
        problems = run_problems(folder, rec)
        return (Status.INVALID.value, "; ".join(problems)) if problems else (status, "")
    if status == Status.RUNNING and not is_locked(folder):
        return Status.INTERRUPTED.value, "killed: the process died before it finished (no error was recorded)"
    return str(status), str(rec.get("error") or "")


# --- locks -------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` across processes (two tables pretraining the same id)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Busy(RuntimeError):
    """Another live process holds the lock."""


@contextlib.contextmanager
def owned(folder: Path, wait_s: float = 5.0) -> Iterator[None]:
    """Holds ``folder/.run.lock`` while a run is alive: the kernel frees it when the process
    dies, so `is_locked` tells a live run from a dead one, and a second process for the same
    run (two sweeps at once) gets `Busy` instead of evaluating it twice. Retries for `wait_s`
    (readers take the lock shared for a moment)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".run.lock", "a") as fh:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise Busy(f"{folder}: another process is running this run") from err
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_locked(folder: Path) -> bool:
    """Whether a live process holds the run's lock (see `owned`)."""
    path = folder / ".run.lock"
    if not path.exists():
        return False
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False
