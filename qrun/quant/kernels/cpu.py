"""The CPU backend: fused kernels for the fake-quant hot paths, compiled from kernels.c on first use.

Why: on CPU an eager quantizer is a chain of elementwise ops, each a pass over an activation-sized tensor and
most a fresh allocation (5 for a grid forward, ~25 for the DSQ backward); those passes, not the arithmetic, are
what fake-quant training costs over float. kernels.c does each direction in one OpenMP loop. It is built once per
machine with the system C compiler (about a second; no torch headers) into a cache folder and loaded with ctypes;
it links the libgomp that torch already loaded, so both share one thread pool.

Everything here is optional: with no compiler, QRUN_KERNELS=0, or a tensor that is not a dense float32 CPU
tensor, callers use their eager path, which computes the same values (tests check both paths agree).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC",
         "-shared")
PARALLEL_MIN = 1 << 16  # below this many elements one thread is faster than waking the pool
ENV_SWITCH = "QRUN_KERNELS"

_f32, _i64, _int, _ptr = ctypes.c_float, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "qrun_levels_forward": (_ptr, _ptr, _ptr, _i64, _f32, _int, _f32, _f32, _f32, _f32, _f32, _f32, _int),
    "qrun_decode": (_ptr, _ptr, _i64, _f32, _f32, _f32, _int),
    "qrun_grid_backward": (_ptr, _ptr, _ptr, _i64, _f32, _f32, _int, _f32, _f32, _f32, _f32, _f32, _ptr, _int),
    "qrun_dsq_backward": (_ptr, _ptr, _ptr, _i64, _f32, _f32, _f32, _f32, _f32, _f32, _f32, _f32, _f32, _f32,
                          _f32, _ptr, _int),
    "qrun_dorefa_weight_forward": (_ptr, _ptr, _i64, _f32, _ptr, _int),
    "qrun_dorefa_weight_backward": (_ptr, _ptr, _ptr, _i64, _f32, _int),
}


def _cache_dir() -> Path:
    root = os.environ.get("QRUN_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qrun" / "kernels"


def _cpu_signature() -> str:
    """The CPU's feature flags: -march=native code must not be reused on a machine that lacks them."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def _compile(compiler: str) -> Path:
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_signature().encode(), platform.machine().encode()])).hexdigest()[:16]
    library = _cache_dir() / f"qrun_kernels_{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_name(f"{library.name}.{os.getpid()}.tmp")
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial), "-lm"], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(partial, library)  # atomic: concurrent sweep jobs never load a half-written file
    return library


@lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None when they are switched off or cannot be built here (logged once)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: quantizers use their slower eager path (install gcc to fix)")
        return None
    try:
        lib = ctypes.CDLL(str(_compile(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        log.warning("building qrun's fused kernels failed, quantizers use their eager path: %s", detail)
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    return lib


def dense(t: torch.Tensor) -> bool:
    """A float32 CPU tensor whose elements fill its storage in some memory order (NCHW or channels_last)."""
    return (t.dtype == torch.float32 and t.device.type == "cpu" and (
        t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))))


def usable(*tensors: torch.Tensor) -> Optional[ctypes.CDLL]:
    """The library when every tensor is dense and laid out like the first (elementwise loops need that)."""
    first = tensors[0]
    if not all(dense(t) and t.shape == first.shape and t.stride() == first.stride() for t in tensors):
        return None
    return library()


def threads(numel: int) -> int:
    return torch.get_num_threads() if numel >= PARALLEL_MIN else 1


class Sums:
    """A small double buffer a kernel writes its reductions into."""

    def __init__(self, count: int) -> None:
        self.buffer = (ctypes.c_double * count)()

    @property
    def address(self) -> int:
        return ctypes.addressof(self.buffer)

    def __getitem__(self, index: int) -> float:
        return self.buffer[index]
