"""One qrun per run folder: a lock file that a second process refuses, and that a dead process leaves behind.

The lock holds the owner's pid, hostname and SLURM job id. It is taken over when its owner is provably gone: a
pid that no longer exists on this host, or the same SLURM job (a requeued job runs again, possibly on another
node, only after SLURM has ended its previous incarnation). A lock of a live process, or of another host that
cannot be checked, is refused with a line that says how to clear it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from qrun.errors import QrunError

LOCK_FILE = ".qrun.lock"


class FolderLocked(QrunError):
    """Another live qrun writes the folder: a sweep records this failure nowhere in that folder."""

    record_in_folder = False


def _identity() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": _slurm_job(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _slurm_job() -> Optional[str]:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else job


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale(owner: dict) -> bool:
    """True when the owner cannot be writing any more."""
    me = _identity()
    if owner.get("slurm_job") and owner.get("slurm_job") == me["slurm_job"]:
        return True
    if owner.get("host") != me["host"]:
        return False
    pid = int(owner.get("pid", -1))
    return pid == os.getpid() or pid <= 0 or not _pid_alive(pid)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def acquire(folder: Path) -> Path:
    """Create folder/.qrun.lock for this process, taking over a stale one; refuse a live owner's."""
    path = folder / LOCK_FILE
    for _ in range(3):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            if not owner and time.time() - _mtime(path) < 10:
                owner = {"pid": "?", "host": "?", "since": "a moment ago"}  # being written right now
            elif not owner:
                owner = {"pid": -1, "host": socket.gethostname()}  # left half-written by a killed process
            if not _stale(owner):
                raise FolderLocked(f"{folder} is in use by qrun pid {owner.get('pid')} on {owner.get('host')} (since "
                                f"{owner.get('since')}); wait for it, or delete {path} if that process is gone")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(handle, "w") as lock:
            json.dump(_identity(), lock)
        return path
    raise QrunError(f"cannot take the lock {path}: another qrun keeps creating it")


def release(path: Path) -> None:
    """Remove the lock if it is still ours."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextmanager
def held(folder: Path, enabled: bool = True) -> Iterator[None]:
    """The folder's lock for the duration of the block (a no-op where `enabled` is false: non-zero DDP ranks)."""
    if not enabled:
        yield
        return
    path = acquire(folder)
    try:
        yield
    finally:
        release(path)
