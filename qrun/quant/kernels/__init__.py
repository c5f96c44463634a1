"""Backends of the quantizers' maths, and the dispatch that picks one per tensor.

    cpu.py + kernels.c   CPU, dense float32: one OpenMP pass per direction, scalars passed as host floats
    triton_backend.py    CUDA (and CPU tensors under TRITON_INTERPRET=1 when forced): one forward kernel per
                         quantizer call, a backward kernel that also reduces the learned-parameter gradients;
                         every scalar (step, alpha, bounds) is read from a device tensor inside the kernel
    device.py            the sync-free path that routes to Triton or to the eager tensor reference, as autograd
                         Functions (eager) and torch.library custom ops (torch.compile)
    eager                the reference: the equations in each quantizer's own file

Two families of callers exist because reading a scalar costs nothing on a CPU and a host sync on a GPU: the
host path (CPU tensors, eager mode) reads scalars with .item() and uses kernels.c or eager ops; the device path
(CUDA tensors, torch.compile, or QRUN_BACKEND forcing it) keeps every scalar a 0-d tensor.

QRUN_BACKEND (read at import): "auto" (default) as above; "triton" sends CPU tensors down the device path with
the Triton kernels (needs TRITON_INTERPRET=1 set before triton is imported: how CI tests the CUDA path);
"tensor" sends them down the device path with the eager tensor reference (what CUDA uses where Triton cannot).
"""

from __future__ import annotations

import contextlib
import os
import threading
from functools import lru_cache
from typing import Iterator

import torch

from qrun.errors import QrunError
from qrun.quant.kernels.cpu import ENV_SWITCH, PARALLEL_MIN, SOURCE, Sums, dense, library, threads, usable

__all__ = ["BACKENDS", "ENV_SWITCH", "PARALLEL_MIN", "SOURCE", "Sums", "backend", "dense", "device_path",
           "float32_results", "library", "result_dtype", "set_backend", "threads", "triton_device", "triton_eager",
           "triton_usable", "usable"]

BACKEND_ENV = "QRUN_BACKEND"
BACKENDS = ("auto", "triton", "tensor")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise QrunError(f"{BACKEND_ENV}={name!r} is not a backend; accepted: {', '.join(BACKENDS)}")
    return name


# Checked on first use, not at import: a bad value then surfaces as a one-line `qrun: error`, not a traceback.
_forced = os.environ.get(BACKEND_ENV, "auto") or "auto"


def set_backend(name: str) -> None:
    """Switch the forced backend at run time (tests; the environment variable is the user-facing switch)."""
    global _forced
    _forced = _checked(name)


def forced() -> str:
    return _checked(_forced)


def device_path(x: torch.Tensor) -> bool:
    """True when a quantizer must keep its scalars on the device: CUDA tensors, torch.compile, or forced."""
    if _forced == "auto":
        return x.is_cuda or torch.compiler.is_compiling()
    return bool(_checked(_forced))


@lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _same_dense_layout(tensors: tuple[torch.Tensor, ...]) -> bool:
    first = tensors[0]
    if not (first.is_contiguous() or (first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last))):
        return False
    return all(t.shape == first.shape and t.stride() == first.stride() for t in tensors[1:])


def triton_device(device: torch.device, dtype: torch.dtype) -> bool:
    """Triton runs on `device` for `dtype`: CUDA, or CPU under the interpreter when QRUN_BACKEND=triton."""
    if _forced == "tensor" or dtype not in TRITON_DTYPES:
        return False
    if device.type == "cuda":
        return _triton_importable()
    return _forced == "triton" and device.type == "cpu" and _interpreting() and _triton_importable()


def triton_usable(*tensors: torch.Tensor) -> bool:
    """The Triton kernels can take these tensors: same dense layout, a float type they compute in fp32 (bf16 and
    fp16 are widened on load), on a device Triton runs on."""
    return triton_device(tensors[0].device, tensors[0].dtype) and _same_dense_layout(tensors)


def backend(x: torch.Tensor) -> str:
    """Which backend runs a quantizer on `x`: "cpu" (kernels.c), "triton", or "eager" (the reference)."""
    if device_path(x):
        return "triton" if triton_usable(x) else "eager"
    return "cpu" if usable(x) is not None else "eager"


def triton_eager(x: torch.Tensor) -> bool:
    """xnor, twn and affine run their Triton passes on `x`: a device-path tensor the kernels take, outside
    torch.compile, which traces those quantizers' eager maths instead (sync-free already, and fused by inductor)."""
    return device_path(x) and not torch.compiler.is_compiling() and triton_usable(x)


_results = threading.local()  # per thread, as autocast's own state (nn.DataParallel runs replicas in threads)


@contextlib.contextmanager
def float32_results() -> Iterator[None]:
    """Within: the Triton passes return float32 outputs for bf16/fp16 inputs (what quantize(x.float()) gives),
    and input gradients in the input's dtype. Under autocast a quantizer then reads the low-precision activation
    the previous layer already holds, instead of saving a float32 copy of it for backward."""
    previous = getattr(_results, "float32", False)
    _results.float32 = True
    try:
        yield
    finally:
        _results.float32 = previous


def result_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if getattr(_results, "float32", False) else x.dtype
