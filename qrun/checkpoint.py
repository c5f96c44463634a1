"""Checkpoints that survive a crash and resume exactly: atomic writes, safe loads, full RNG state.

A checkpoint is plain containers and tensors only, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from qrun.errors import QrunError

FORMAT_VERSION = 1
LAST, BEST = "last.pt", "best.pt"
# What must agree between a checkpoint and the config that loads it; anything else (lr, epochs...) may change.
ARCHITECTURE_KEYS = ("model", "dataset", "quant", "w_bits", "a_bits", "quantize_input")


def atomic_save(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp:
            torch.save(payload, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise QrunError(f"checkpoint not found: {path}") from None
    except Exception as error:  # a truncated or foreign file
        raise QrunError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        found = payload.get("format_version") if isinstance(payload, dict) else type(payload).__name__
        raise QrunError(f"{path} is not a qrun checkpoint of format {FORMAT_VERSION} (found {found!r})")
    return payload


def resolve(resume: str, prefer: str = LAST) -> Path:
    """Accept a checkpoint file or a run directory (then checkpoints/<prefer>, falling back to the other)."""
    path = Path(resume).expanduser()
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        for name in (prefer, BEST if prefer == LAST else LAST):
            if (folder / name).is_file():
                return folder / name
        raise QrunError(f"no {LAST} or {BEST} in {folder}; resume= takes a checkpoint file or a qrun run directory")
    if not path.is_file():
        raise QrunError(f"resume={resume} does not exist; resume= takes a checkpoint file or a qrun run directory")
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
                  config: dict[str, Any], scaler_state: Optional[dict] = None) -> dict[str, Any]:
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
    }
