"""Straight-through building blocks shared by several quantizers.

Speed matters here: activation quantizers touch every element of every layer input twice per step. Eager
PyTorch on CPU is fast for in-place arithmetic with Python-scalar operands and for the fused `hardtanh_backward`
and `threshold_backward` kernels, and slow for boolean masks, `torch.where` and tensor-valued clamp bounds
(measured: a bool mask plus `where` costs ~10x a fused backward kernel). So scalars are read with `.item()`
(one host sync per quantizer call on GPU) and masks are expressed through those two kernels. On CPU, dense
float32 tensors go through kernels.c instead (one pass per direction, see qrun/quant/kernels.py); the eager
code below is the path for every other tensor and the reference the kernels are tested against.
"""

from __future__ import annotations

import contextlib
import math
from typing import ContextManager, NamedTuple, Optional

import numpy as np
import torch
from torch.autograd import Function

from qrun.quant import kernels

_hardtanh_backward = torch.ops.aten.hardtanh_backward
_threshold_backward = torch.ops.aten.threshold_backward


def scalar(value: torch.Tensor | float) -> float:
    """A Python float from a 0-d tensor or a number (so kernels take the fast scalar-operand path)."""
    return float(value.detach().item()) if isinstance(value, torch.Tensor) else float(value)


def _next(value: float, dtype: torch.dtype, direction: float) -> float:
    if dtype == torch.float32:
        return float(np.nextafter(np.float32(value), np.float32(direction)))
    if dtype == torch.float64:
        return math.nextafter(value, direction)
    v = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(v, torch.tensor(direction, dtype=dtype)))


def below(value: float, dtype: torch.dtype) -> float:
    """The largest `dtype` number smaller than `value`: turns the strict `x > t` of the fused kernels into `x >= value`."""
    return _next(value, dtype, -math.inf)


def above(value: float, dtype: torch.dtype) -> float:
    """The smallest `dtype` number larger than `value`."""
    return _next(value, dtype, math.inf)


def pass_inside(grad: torch.Tensor, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """grad where lo <= x <= hi, else 0: the clipped straight-through estimator (bounds inclusive)."""
    return _hardtanh_backward(grad, x, below(lo, x.dtype), above(hi, x.dtype))


def sum_above(grad: torch.Tensor, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sum of grad over elements with x > threshold (a clip bound's gradient from the elements it clips)."""
    return _threshold_backward(grad, x, threshold).sum()


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) in one pass over memory, also for channels_last tensors (reshape would copy those)."""
    if a.dim() == 4 and not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last) \
            and b.is_contiguous(memory_format=torch.channels_last):
        a, b = a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    return torch.sum(a * b)


# Compact saved activations. A fake-quantized layer input y = offset + scale * q is saved by the following conv
# for its weight gradient; keeping it as float would add a full activation-sized tensor per layer (~1.5x peak
# memory on resnet20). Each activation quantizer therefore also returns the integer codes q (1 byte per element
# up to 8 bits) attached to y, and the layer runs its conv under `saving_codes`, which stores the codes instead
# of y and rebuilds y bit-exactly (same float operations as the forward) when backward needs it.
CODES_ATTR = "_qrun_codes"


class Codes(NamedTuple):
    """y = offset + scale * (codes + shift), codes an integer tensor."""

    codes: torch.Tensor
    scale: float
    offset: float
    dtype: torch.dtype
    shift: int = 0
    fused: bool = False  # made by kernels.c, whose decode repeats the forward's float operations exactly
    # Made on the device path: [scale, offset] as a float32 device tensor (scale/offset above are unused), and
    # y = codes' level * affine[0] + affine[1], as that path's forward computes it.
    affine: Optional[torch.Tensor] = None


def int8_shift(qmin: int, qmax: int) -> Optional[int]:
    """The shift that fits levels [qmin, qmax] into int8 codes (as `encode` stores them); None if none does."""
    if -128 <= qmin and qmax <= 127:
        return 0
    return qmin + 128 if qmax - qmin <= 255 else None


def encode(q: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, int]:
    """Integer codes for float-held integer levels q in [qmin, qmax], and the shift that restores q.

    int8 whenever 256 levels suffice: float -> int8 conversion is ~10x faster than float -> uint8 on CPU here,
    so 8-bit unsigned grids are stored shifted by -128.
    """
    shift = int8_shift(qmin, qmax)
    if shift is not None:
        return (torch.sub(q, shift) if shift else q).to(torch.int8), shift
    dtype = torch.int16 if -(2**15) <= qmin and qmax < 2**15 else torch.int32
    return q.to(dtype), 0


def levels_of(codes: torch.Tensor, shift: int, dtype: torch.dtype) -> torch.Tensor:
    """The float integer levels q back from `encode`'s codes."""
    q = codes.to(dtype)
    return q.add_(shift) if shift else q


def affine_levels(q: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """offset + scale * q, in place on q, in one pass (the one formula both forward and `decode` use)."""
    if offset == 0.0:
        return q.mul_(scale)
    return torch.add(torch.tensor(offset, dtype=q.dtype, device=q.device), q, alpha=scale, out=q)


def decode(c: Codes) -> torch.Tensor:
    if c.affine is not None:
        from qrun.quant.kernels import device

        return device.decode(c.codes, c.affine, c.shift, c.dtype)
    lib = kernels.library() if c.fused else None
    if lib is None:
        return affine_levels(levels_of(c.codes, c.shift, c.dtype), c.scale, c.offset)
    y = torch.empty_like(c.codes, dtype=c.dtype)
    lib.qrun_decode(c.codes.data_ptr(), y.data_ptr(), y.numel(), c.scale, c.offset, c.shift,
                    kernels.threads(y.numel()))
    return y


def _pack(t: torch.Tensor) -> object:
    codes = getattr(t, CODES_ATTR, None)
    return t if codes is None else codes


def _unpack(saved: object) -> torch.Tensor:
    return decode(saved) if isinstance(saved, Codes) else saved


def saving_codes(y: torch.Tensor) -> ContextManager:
    """Context for the op consuming y: it saves y's codes instead of y when y carries them."""
    if getattr(y, CODES_ATTR, None) is None:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


def fused_levels(x: torch.Tensor, inv_step: float, qmin: int, qmax: int, scale: float, offset: float, shift: int,
                 compact: bool, floor_shift: Optional[float]) -> tuple[torch.Tensor, Optional[Codes]]:
    """kernels.c's one-pass forward: levels q = clamp(round(x * inv_step)) (or, with `floor_shift`,
    clamp(floor(x * inv_step + floor_shift)), DSQ's rule), y = offset + scale * q, and int8 codes when `compact`."""
    y = torch.empty_like(x)
    codes = torch.empty_like(x, dtype=torch.int8) if compact else None
    kernels.library().qrun_levels_forward(x.data_ptr(), y.data_ptr(), codes.data_ptr() if compact else None,
                                          x.numel(), inv_step, floor_shift is not None, floor_shift or 0.0, qmin,
                                          qmax, scale, offset, shift, kernels.threads(x.numel()))
    return y, (Codes(codes, scale, offset, x.dtype, shift, fused=True) if compact else None)


def grid_levels(x: torch.Tensor, step: float, qmin: int, qmax: int) -> torch.Tensor:
    """clamp(round(x * (1/step)), qmin, qmax) as floats in a fresh tensor: the eager levels, whose float operations
    a backward that recomputes them must repeat exactly."""
    return torch.mul(x, 1.0 / step).round_().clamp_(qmin, qmax)


def grid_codes(x: torch.Tensor, step: float, qmin: int, qmax: int, compact: bool) -> torch.Tensor:
    """step * clamp(round(x / step), qmin, qmax), with the integer codes attached to the result when `compact`.

    One fused pass when kernels.c is available; else one allocation and in-place eager ops (same values).
    """
    shift = int8_shift(qmin, qmax)
    if shift is not None and kernels.usable(x) is not None:
        y, codes = fused_levels(x, 1.0 / step, qmin, qmax, step, 0.0, shift, compact, floor_shift=None)
        if codes is not None:
            setattr(y, CODES_ATTR, codes)
        return y
    q = grid_levels(x, step, qmin, qmax)
    if not compact:
        return q.mul_(step)
    codes, shift = encode(q, qmin, qmax)
    y = q.mul_(step)
    setattr(y, CODES_ATTR, Codes(codes, step, 0.0, y.dtype, shift))
    return y


def grid_backward(grad: torch.Tensor, x: torch.Tensor, lo_t: float, hi_t: float, in_place: bool,
                  rule: int = 0, inv_step: float = 1.0, qmin: float = 0.0, qmax: float = 0.0,
                  above_t: float = math.inf, below_t: float = -math.inf) -> Optional[tuple[torch.Tensor, float, float]]:
    """kernels.c's straight-through backward: (grad where lo_t < x < hi_t else 0, and the two sums of `rule`).

    None when the kernel cannot take these tensors (the caller then runs its eager backward). `in_place` writes
    the result over `grad`: only for a gradient nobody else holds, the input gradient of the quantized layer's
    own conv/linear.
    """
    lib = kernels.usable(x, grad)
    if lib is None:
        return None
    out = grad if in_place else torch.empty_like(grad)
    sums = kernels.Sums(2)
    lib.qrun_grid_backward(grad.data_ptr(), x.data_ptr(), out.data_ptr(), x.numel(), lo_t, hi_t, rule, inv_step,
                           qmin, qmax, above_t, below_t, sums.address, kernels.threads(x.numel()))
    return out, sums[0], sums[1]


GRID_PLAIN, GRID_LSQ, GRID_PACT = 0, 1, 2  # the `rule` values of kernels.c's qrun_grid_backward


# The device path's reference (CUDA tensors that Triton cannot take, QRUN_BACKEND=tensor, and what the Triton
# kernels are tested against): the same grid with its scalars kept as 0-d tensors, computed in float32.
def grid_reference_forward(x: torch.Tensor, src: torch.Tensor, divisor: float, min_src: float, qmin: int, qmax: int,
                           code_shift: Optional[int]) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(y = step * clamp(round(x / step), qmin, qmax), int8 codes q - code_shift or None, [step, 0, lo, hi]).

    The clip range [lo, hi] is src * (qmin / divisor) .. src * (qmax / divisor): exactly +-src when the top level
    is src itself (uniform's range, max|W|, PACT's alpha), where qmax * step could round below the element that
    set the range. Backward reads it (and the step) from the returned affine, not from src, which may change."""
    bound = src.detach().float().clamp(min=min_src)
    # Divided by a tensor: CUDA divides by a Python number as a * (1/b), one ulp off the kernels' division.
    step = bound / torch.full_like(bound, divisor)
    offset = torch.zeros_like(step)
    # x times divisor / src, rounded once (as kernels.c's double 1 / step): 1 / step would round twice.
    q = torch.mul(x.float(), torch.full_like(bound, divisor) / bound).round_().clamp_(qmin, qmax)
    codes = None if code_shift is None else torch.sub(q, code_shift).to(torch.int8)
    affine = torch.stack([step, offset, bound * (qmin / divisor), bound * (qmax / divisor)])
    return torch.mul(q, step).add_(offset).to(x.dtype), codes, affine


def grid_reference_backward(grad: torch.Tensor, x: torch.Tensor, affine: torch.Tensor, qmin: int, qmax: int,
                            rule: int, grad_scale: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(grad_x, gradient of the step source): the clipped STE, with LSQ's step gradient (eq. 3) or PACT's alpha
    gradient (eq. 3 of PACT: the elements at or above alpha, minus those at or below -alpha when signed)."""
    g, xf, step, lo, hi = grad.float(), x.float(), affine[0], affine[2], affine[3]
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    if rule == GRID_PACT:
        grad_x = torch.where((xf >= lo) & (xf < hi), g, zero)
        grad_src = torch.where(xf >= hi, g, zero).sum()
        if qmin < 0:
            grad_src = grad_src - torch.where(xf <= lo, g, zero).sum()
        return grad_x.to(grad.dtype), grad_src
    grad_x = torch.where((xf >= lo) & (xf <= hi), g, zero)
    if rule == GRID_PLAIN:
        return grad_x.to(grad.dtype), None
    q = torch.mul(xf, 1.0 / step).round_().clamp_(qmin, qmax)  # LSQ: divisor 1, so the forward's levels
    grad_step = ((g * q).sum() - (grad_x * xf).sum() / step) * grad_scale
    return grad_x.to(grad.dtype), grad_step


class _GridFakeQuant(Function):
    """Fixed grid {qmin..qmax} * step; gradient 1 inside [qmin*step, qmax*step], 0 outside (clipped STE)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: float, qmin: int, qmax: int, compact: bool, grad_in_place: bool):
        ctx.save_for_backward(x)
        ctx.bounds = (qmin * step, qmax * step)
        ctx.grad_in_place = grad_in_place
        y = grid_codes(x, step, qmin, qmax, compact)
        return y, getattr(y, CODES_ATTR, None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _codes_grad: object):
        (x,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        fused = grid_backward(grad, x, below(lo, x.dtype), above(hi, x.dtype), ctx.grad_in_place)
        grad_x = pass_inside(grad, x, lo, hi) if fused is None else fused[0]
        return grad_x, None, None, None, None, None


def with_codes(y: torch.Tensor, codes: object) -> torch.Tensor:
    """Re-attach codes to the tensor that autograd hands back from a Function."""
    if codes is not None:
        setattr(y, CODES_ATTR, codes)
    return y


def grid_fake_quant(x: torch.Tensor, step: float, qmin: int, qmax: int, compact: bool = False,
                    grad_in_place: bool = False) -> torch.Tensor:
    """Fake-quantize to the integer grid [qmin, qmax] times `step` with a clipped straight-through gradient.

    `compact`: attach integer codes so the consuming layer can save 1 byte per element (see `saving_codes`).
    `grad_in_place`: the output's gradient is the layer's own (see `grid_backward`) and may be overwritten.
    """
    return with_codes(*_GridFakeQuant.apply(x, step, qmin, qmax, compact, grad_in_place))


class _RoundSTE(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the STE of Bengio et al. 2013, as used by DoReFa eq. 4)."""
    return _RoundSTE.apply(x)


def sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, so a binarized tensor has exactly two values."""
    y = torch.where(x >= 0, 1.0, -1.0)
    # No no-op .to(): torch 2.11's dynamo gives an autograd.Function whose forward returns such an alias (or the
    # result of an in-place or out= op) a zero gradient (tests/test_compile.py, autocast and fp32).
    return y if y.dtype == x.dtype else y.to(x.dtype)


class _SignSTE(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, saturate: bool, compact: bool):
        ctx.saturate = saturate
        if saturate:
            ctx.save_for_backward(x)
        y = sign(x)
        return y, (Codes(y.to(torch.int8), 1.0, 0.0, y.dtype) if compact else None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _codes_grad: object):
        if not ctx.saturate:
            return grad, None, None
        (x,) = ctx.saved_tensors
        return pass_inside(grad, x, -1.0, 1.0), None, None


def sign_ste(x: torch.Tensor, saturate: bool = True, compact: bool = False) -> torch.Tensor:
    """sign forward; backward identity, zeroed for |x| > 1 when `saturate` (XNOR-Net/BNN's hard-tanh STE).

    `compact`: attach int8 codes so the consuming layer saves 1 byte per element.
    """
    return with_codes(*_SignSTE.apply(x, saturate, compact))
