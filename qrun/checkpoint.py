"""Checkpoints that survive a crash and resume exactly: atomic writes, safe loads, full RNG state.

A checkpoint is plain containers and tensors only, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from qrun.errors import QrunError

FORMAT_VERSION = 1
LAST, BEST = "last.pt", "best.pt"
# What every qrun checkpoint holds (calibrated ones have empty optimizer and scheduler states).
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_top1", "metrics", "architecture", "config", "rng")
# What must agree between a checkpoint and the config that loads it; anything else (lr, epochs...) may change.
ARCHITECTURE_KEYS = ("model", "dataset", "quant", "w_bits", "a_bits", "quantize_input")


# Test hook: QRUN_TEST_KILL="point:file:n[,...]" SIGKILLs this process at the n-th write of `file` at `point`
# (before_tmp, before_rename, after_rename), so tests can kill a real process inside a checkpoint write.
KILL_POINTS_ENV = "QRUN_TEST_KILL"
_writes: dict[tuple[str, str], int] = {}


def _kill_point(point: str, path: Path) -> None:
    spec = os.environ.get(KILL_POINTS_ENV)
    if not spec:
        return
    key = (point, path.name)
    _writes[key] = _writes.get(key, 0) + 1
    for item in spec.split(","):
        want_point, want_name, count = item.split(":")
        if (want_point, want_name) == key and int(count) == _writes[key]:
            os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: the directory entry, not only the file, must reach the disk."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_save(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves half a file."""
    _kill_point("before_tmp", path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise write_error(path, error) from None
    try:
        with os.fdopen(handle, "wb") as tmp:
            torch.save(payload, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        _kill_point("before_rename", path)
        os.replace(tmp_name, path)
    except BaseException as error:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise write_error(path, error) from None
        raise
    _fsync_dir(path.parent)
    _kill_point("after_rename", path)


def write_error(path: Path, error: OSError) -> QrunError:
    """A full disk or a read-only folder as one line naming the path (the previous checkpoint is intact)."""
    return QrunError(f"cannot write {path}: {error.strerror or error}; the previous checkpoint, if any, is intact")


def atomic_copy(source: Path, path: Path) -> None:
    """`source`'s bytes as `path`, with the same temporary-file-and-rename protocol as atomic_save."""
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp, open(source, "rb") as src:
            shutil.copyfileobj(src, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files of writes a kill interrupted (`.last.pt.*.tmp`); only call while holding the folder lock."""
    stale = sorted(folder.glob(".*.pt.*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def repair_best(last_payload: dict[str, Any], last_path: Path, best_path: Path) -> Optional[str]:
    """Make best.pt agree with last.pt, the commit point, after a kill between the two writes.

    last.pt records `best_epoch`; the pair is written last first, so the only inconsistency a kill can leave is
    a best.pt older than the best epoch last.pt names, and then last.pt, written at the end of that very epoch,
    holds the best weights. Returns what was done, or None.
    """
    best_epoch = last_payload.get("best_epoch")
    if best_epoch is None or last_payload.get("position") is not None:
        return None
    if best_path.is_file():
        try:
            if torch.load(best_path, map_location="cpu", weights_only=True, mmap=True).get("epoch") == best_epoch:
                return None
        except Exception:  # a foreign or damaged best.pt is replaced like a stale one
            pass
    if best_epoch != last_payload.get("epoch"):
        return None
    atomic_copy(last_path, best_path)
    return f"{best_path} restored from {last_path} (best epoch {best_epoch})"


def carry_best(last_payload: dict[str, Any], last_path: Path, best_path: Path) -> Optional[str]:
    """A run resumed into a new folder starts with its source's best.pt, so the best so far is not lost."""
    best_epoch = last_payload.get("best_epoch")
    if best_path.exists() or best_epoch is None:
        return None
    source_best = last_path.with_name(BEST)
    if source_best.is_file() and torch.load(source_best, map_location="cpu", weights_only=True,
                                            mmap=True).get("epoch") == best_epoch:
        source = source_best
    elif last_payload.get("epoch") == best_epoch and last_payload.get("position") is None:
        source = last_path
    else:
        return None
    best_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_copy(source, best_path)
    return f"{best_path} copied from {source} (best epoch {best_epoch})"


def load(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A qrun checkpoint, loaded without executing code; `mmap` reads tensors lazily (to look at the config only)."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise QrunError(f"checkpoint not found: {path}") from None
    except Exception as error:  # a truncated or foreign file, or a pickle that is not plain tensors and containers
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise QrunError(f"cannot read checkpoint {path}: {type(error).__name__}: {first_line}") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        found = payload.get("format_version") if isinstance(payload, dict) else type(payload).__name__
        raise QrunError(f"{path} is not a qrun checkpoint of format {FORMAT_VERSION} (found {found!r})")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise QrunError(f"{path} is a partial qrun checkpoint (no {', '.join(missing)}); pass one written by qrun")
    return payload


def resolve(resume: str, prefer: str = LAST, key: str = "resume") -> Path:
    """Accept a checkpoint file or a run directory (then checkpoints/<prefer>, falling back to the other);
    `key` is the option the path came from, named in the errors."""
    path = Path(resume).expanduser()
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        for name in (prefer, BEST if prefer == LAST else LAST):
            if (folder / name).is_file():
                return folder / name
        raise QrunError(f"no {LAST} or {BEST} in {folder}; {key}= takes a checkpoint file or a qrun run directory")
    if not path.is_file():
        raise QrunError(f"{key}={resume} does not exist; {key}= takes a checkpoint file or a qrun run directory")
    return path


def check_architecture(saved: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint made for another model, dataset, quantizer or bit width, naming every difference."""
    differences = [f"{key}: checkpoint has {saved.get(key)!r}, config has {expected[key]!r}"
                   for key in ARCHITECTURE_KEYS if saved.get(key) != expected[key]]
    if differences:
        raise QrunError(f"checkpoint {path} does not match the config ({'; '.join(differences)}); "
                        "pass the matching overrides or another checkpoint")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _plain_python_state(random.getstate()),
        "numpy": _plain_numpy_state(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU the saving run saw; a resume may see fewer (CUDA_VISIBLE_DEVICES, a smaller node) or
        # more: restore those both have (set_rng_state_all would raise IndexError on the missing devices).
        for index, cuda_state in zip(range(torch.cuda.device_count()), state["cuda"]):
            torch.cuda.set_rng_state(cuda_state, index)


def _plain_python_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _plain_numpy_state(state: tuple) -> list:
    kind, keys, pos, has_gauss, cached = state
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def build_payload(*, model_state: dict, optimizer_state: dict, scheduler_state: dict, epoch: int,
                  best_top1: float, metrics: dict[str, float], architecture: dict[str, Any],
                  config: dict[str, Any], scaler_state: Optional[dict] = None, **extra: Any) -> dict[str, Any]:
    """`extra` (trainer bookkeeping: best_epoch, position, schedule, history, ...) is stored as given."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler_state,
        "scaler": scaler_state,
        "epoch": epoch,
        "best_top1": best_top1,
        "metrics": metrics,
        "architecture": architecture,
        "config": config,
        "rng": rng_state(),
        **extra,
    }
