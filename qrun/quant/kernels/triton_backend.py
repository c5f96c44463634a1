"""The Triton backend: the quantizers' forward and backward passes as single kernels, scalars read on the device.

Why: on CUDA an eager quantizer is a chain of small kernels and each `.item()` a host sync that drains the launch
queue. Here a forward is one kernel (levels, output, 1-byte codes, and the affine map [scale, offset] it used,
and clip range it used, which backward and the codes' decode reuse), a backward one kernel writing the input gradient and per-block
partial sums, then one single-program kernel that reduces them into the learned parameters' gradients.

Floating-point contract (what the tests hold the kernels to, against the eager tensor reference): every input is
computed in float32 (bf16/fp16 inputs are widened on load, outputs rounded back to the input's dtype); divisions
are correctly rounded (div_rn), no multiply-add is fused (`enable_fp_fusion=False`), rounding is half to even.
So levels, outputs and codes equal the reference's bit for bit; sums differ only by summation order.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _disable_current_modes

BLOCK = 1024
REDUCE_BLOCK = 1024
GRID_PLAIN, GRID_LSQ, GRID_PACT = 0, 1, 2
# Clamps keep a NaN, as torch.clamp does (Triton's default drops it: a diverging value would become a level).
NAN = tl.constexpr(tl.PropagateNan.ALL)

launches = 0  # kernels launched by this process (the step-count test reads it)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(kernel, programs: int, *args, **constexprs) -> None:
    global launches
    launches += 1
    if _INTERPRET:
        # The interpreter emulates a launch with host copies of every tensor argument; those are not operations
        # of the CUDA path, so dispatch modes (the step-count test) must not see them.
        with _disable_current_modes():
            kernel[(programs,)](*args, **constexprs)
    else:
        kernel[(programs,)](*args, enable_fp_fusion=False, **constexprs)


def _programs(n: int) -> int:
    return max(1, triton.cdiv(n, BLOCK))


@triton.jit
def _store(ptr, value, mask):
    """Store float32 `value` in ptr's dtype, rounding to nearest even. For bf16 the rounding is done here on the
    bits, so it does not depend on the backend (Triton's interpreter truncates float32 -> bf16; CUDA rounds)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # A NaN stays NaN: CUDA's 0x7FFFFFFF would carry into the sign bit and round to -0.0.
        value = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))
    tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_half_even(v):
    f = tl.floor(v)
    d = v - f  # exact for |v| < 2^24
    half = f * 0.5
    odd = half != tl.floor(half)
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _affine_of(src_ptr, hi_ptr, divisor, min_src, levels, lo_ratio, hi_ratio, DSQ: tl.constexpr):
    """(scale, inverse scale, floor shift, offset, clip low, clip high): a grid's step = max(src, min_src) / divisor
    and clip range src * (qmin / divisor) .. src * (qmax / divisor) (exactly +-src when the top level is src:
    uniform's range and max|W|, PACT's alpha); DSQ's Delta = (u - l) / n and clip range [l, u]."""
    if DSQ:
        lo = tl.load(src_ptr).to(tl.float32)
        hi = tl.load(hi_ptr).to(tl.float32)
        scale = tl.math.div_rn(hi - lo, levels)
        inv = tl.math.div_rn(1.0, scale)
        shift = 0.5 - tl.math.div_rn(lo, scale)
        offset = lo
    else:
        src = tl.maximum(tl.load(src_ptr).to(tl.float32), min_src, propagate_nan=NAN)
        scale = tl.math.div_rn(src, divisor)
        inv = tl.math.div_rn(1.0, scale)
        shift = 0.0
        offset = scale * 0.0
        lo = src * lo_ratio
        hi = src * hi_ratio
    return scale, inv, shift, offset, lo, hi


@triton.jit
def _levels(x, inv, shift, qmin, qmax, DSQ: tl.constexpr):
    if DSQ:
        v = tl.floor(x * inv + shift)
    else:
        v = _round_half_even(x * inv)
    return tl.minimum(tl.maximum(v, qmin, propagate_nan=NAN), qmax, propagate_nan=NAN)


@triton.jit
def _forward_kernel(x_ptr, y_ptr, codes_ptr, src_ptr, hi_ptr, aff_ptr, n, divisor, min_src, qmin, qmax, code_shift,
                    lo_ratio, hi_ratio, DSQ: tl.constexpr, CODES: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    scale, inv, shift, offset, clip_lo, clip_hi = _affine_of(src_ptr, hi_ptr, divisor, min_src, qmax, lo_ratio,
                                                             hi_ratio, DSQ)
    if pid == 0:  # what backward and the codes' decode reuse: [scale, offset, clip low, clip high]
        tl.store(aff_ptr, scale)
        tl.store(aff_ptr + 1, offset)
        tl.store(aff_ptr + 2, clip_lo)
        tl.store(aff_ptr + 3, clip_hi)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = _levels(x, inv, shift, qmin, qmax, DSQ)
    _store(y_ptr + offs, (q * scale + offset), mask)
    if CODES:
        tl.store(codes_ptr + offs, (q - code_shift).to(tl.int8), mask=mask)


@triton.jit
def _decode_kernel(codes_ptr, y_ptr, aff_ptr, n, code_shift, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32) + code_shift
    y = q * tl.load(aff_ptr) + tl.load(aff_ptr + 1)
    _store(y_ptr + offs, y, mask)


@triton.jit
def _grid_backward_kernel(g_ptr, x_ptr, gx_ptr, aff_ptr, part_ptr, n, qmin, qmax,
                          RULE: tl.constexpr, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    step = tl.load(aff_ptr)
    lo = tl.load(aff_ptr + 2)
    hi = tl.load(aff_ptr + 3)
    if RULE == 2:  # PACT: pass inside [lo, alpha), alpha collects x >= alpha (and -(x <= -alpha) when signed)
        gx = tl.where((x >= lo) & (x < hi), g, 0.0)
        s0 = tl.sum(tl.where(x >= hi, g, 0.0), axis=0)
        if SIGNED:
            s1 = tl.sum(tl.where(x <= lo, g, 0.0), axis=0)
        else:
            s1 = s0 * 0.0
    else:
        gx = tl.where((x >= lo) & (x <= hi), g, 0.0)
        if RULE == 1:  # LSQ: sum g q and sum g_inside x
            q = _levels(x, tl.math.div_rn(1.0, step), 0.0, qmin, qmax, False)
            s0 = tl.sum(g * q, axis=0)
            s1 = tl.sum(gx * x, axis=0)
        else:
            s0 = 0.0
            s1 = 0.0
    _store(gx_ptr + offs, gx, mask)
    if RULE != 0:
        tl.store(part_ptr + pid * 2, s0)
        tl.store(part_ptr + pid * 2 + 1, s1)


@triton.jit
def _sum_partials(part_ptr, blocks, RBLOCK: tl.constexpr):
    """The two per-block partial sums of a backward kernel, reduced in a fixed order (deterministic, no atomics)."""
    acc0 = tl.zeros((RBLOCK,), dtype=tl.float32)
    acc1 = tl.zeros((RBLOCK,), dtype=tl.float32)
    for start in range(0, blocks, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        mask = idx < blocks
        acc0 += tl.load(part_ptr + idx * 2, mask=mask, other=0.0)
        acc1 += tl.load(part_ptr + idx * 2 + 1, mask=mask, other=0.0)
    return tl.sum(acc0, axis=0), tl.sum(acc1, axis=0)


@triton.jit
def _grid_finish_kernel(part_ptr, blocks, aff_ptr, out_ptr, grad_scale, RULE: tl.constexpr,
                        RBLOCK: tl.constexpr):
    s0, s1 = _sum_partials(part_ptr, blocks, RBLOCK)
    if RULE == 1:
        out = (s0 - tl.math.div_rn(s1, tl.load(aff_ptr))) * grad_scale
    else:
        out = s0 - s1
    tl.store(out_ptr, out)


@triton.jit
def _dsq_backward_kernel(g_ptr, x_ptr, gx_ptr, lo_ptr, hi_ptr, alpha_ptr, part_ptr, n, levels,
                         BLOCK: tl.constexpr):
    """DSQ's backward through phi (qrun/quant/dsq.py's closed forms) and its six partial sums."""
    pid = tl.program_id(0)
    lo = tl.load(lo_ptr).to(tl.float32)
    hi = tl.load(hi_ptr).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    delta = tl.math.div_rn(hi - lo, levels)
    inv = tl.math.div_rn(1.0, delta)
    shift = 0.5 - tl.math.div_rn(lo, delta)
    lo_over_delta = tl.math.div_rn(lo, delta)
    s = tl.math.div_rn(1.0, 1.0 - alpha)
    c = tl.log(tl.math.div_rn(2.0, alpha) - 1.0)
    alpha_coef = tl.math.div_rn(-4.0 * s, c * alpha * (2.0 - alpha))
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(tl.floor(x * inv + shift), 0.0, propagate_nan=NAN), levels, propagate_nan=NAN)
    g_in = tl.where((x >= lo) & (x <= hi), g, 0.0)
    d = (q - x * inv) + lo_over_delta  # q - r: its sign is the sign of f, |f| = 1/2 - |d|
    a = c - 2.0 * c * tl.abs(d)  # 2 c |f|
    p = 1.0 / (1.0 + tl.exp(-a))  # |t| = 2p - 1, 1 - t^2 = 4 p (1 - p)
    pq = p - p * p
    gx = g_in * pq * (2.0 * s * c)
    h = (pq * a * alpha_coef + 2.0 * s * s * p - s * s) * g_in
    _store(gx_ptr + offs, gx, mask)
    base = part_ptr + pid * 6
    tl.store(base, tl.sum(g, axis=0))
    tl.store(base + 1, tl.sum(tl.where(x > hi, g, 0.0), axis=0))
    tl.store(base + 2, tl.sum(g_in * q, axis=0))
    tl.store(base + 3, tl.sum(gx, axis=0))
    tl.store(base + 4, tl.sum(gx * x, axis=0))
    tl.store(base + 5, tl.sum(tl.where(d > 0.0, h, -h), axis=0))


@triton.jit
def _dsq_finish_kernel(part_ptr, blocks, lo_ptr, hi_ptr, out_ptr, levels, RBLOCK: tl.constexpr):
    """(dL/dl, dL/du, dL/dalpha) from the six sums (dsq.range_gradients)."""
    lane = tl.arange(0, 8)
    acc = tl.zeros((RBLOCK, 8), dtype=tl.float32)
    for start in range(0, blocks, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        mask = (idx[:, None] < blocks) & (lane[None, :] < 6)
        acc += tl.load(part_ptr + idx[:, None] * 6 + lane[None, :], mask=mask, other=0.0)
    sums = tl.sum(acc, axis=0)
    sum_g = tl.sum(tl.where(lane == 0, sums, 0.0), axis=0)
    sum_above = tl.sum(tl.where(lane == 1, sums, 0.0), axis=0)
    sum_gin_q = tl.sum(tl.where(lane == 2, sums, 0.0), axis=0)
    sum_gx = tl.sum(tl.where(lane == 3, sums, 0.0), axis=0)
    sum_gx_x = tl.sum(tl.where(lane == 4, sums, 0.0), axis=0)
    signed_h = tl.sum(tl.where(lane == 5, sums, 0.0), axis=0)
    lo = tl.load(lo_ptr).to(tl.float32)
    delta = tl.math.div_rn(tl.load(hi_ptr).to(tl.float32) - lo, levels)
    grad_upper = sum_above + tl.math.div_rn(sum_gin_q - tl.math.div_rn(sum_gx_x - lo * sum_gx, delta), levels)
    tl.store(out_ptr, sum_g - sum_gx - grad_upper)
    tl.store(out_ptr + 1, grad_upper)
    tl.store(out_ptr + 2, signed_h * (delta * 0.5))


@triton.jit
def _max_abs_kernel(t_ptr, part_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    t = tl.load(t_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.max(tl.abs(t), axis=0))


@triton.jit
def _peak_kernel(part_ptr, blocks, peak_ptr, RBLOCK: tl.constexpr):
    acc = tl.zeros((RBLOCK,), dtype=tl.float32)
    for start in range(0, blocks, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        acc = tl.maximum(acc, tl.load(part_ptr + idx, mask=idx < blocks, other=0.0))
    tl.store(peak_ptr, tl.max(acc, axis=0))


@triton.jit
def _dorefa_weight_kernel(t_ptr, y_ptr, peak_ptr, n, levels, BLOCK: tl.constexpr):
    """2 round((t / (2 peak) + 1/2) n) / n - 1, operation for operation like dorefa._DoReFaWeight's eager path."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = _round_half_even((tl.math.div_rn(t, 2.0 * tl.load(peak_ptr)) + 0.5) * levels)
    _store(y_ptr + offs, (tl.math.div_rn(v, levels) * 2.0 - 1.0), mask)


@triton.jit
def _dorefa_sums_kernel(g_ptr, t_ptr, peak_ptr, part_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    at_peak = (tl.abs(t) == tl.load(peak_ptr)) & mask
    tl.store(part_ptr + pid * 2, tl.sum(g * t, axis=0))
    tl.store(part_ptr + pid * 2 + 1, tl.sum(at_peak.to(tl.float32), axis=0))


@triton.jit
def _dorefa_grad_kernel(g_ptr, t_ptr, gw_ptr, peak_ptr, part_ptr, blocks, n, BLOCK: tl.constexpr,
                        RBLOCK: tl.constexpr):
    """(1 - t^2) (g / peak - [|t| = peak] sgn(t) <g, t> / (peak^2 #peak)); every program reduces the partials."""
    s0, s1 = _sum_partials(part_ptr, blocks, RBLOCK)
    peak = tl.load(peak_ptr)
    through_peak = tl.math.div_rn(s0, peak * peak * s1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    correction = tl.where(tl.abs(t) == peak, tl.where(t > 0.0, through_peak, -through_peak), 0.0)
    gw = (tl.math.div_rn(g, peak) - correction) * (1.0 - t * t)
    _store(gw_ptr + offs, gw, mask)


@triton.jit
def _ema_kernel(range_ptr, batch_ptr, momentum, floor):
    """range <- range + momentum (max(batch, floor) - range): the activation range's moving average."""
    r = tl.load(range_ptr)
    b = tl.maximum(tl.load(batch_ptr).to(tl.float32), floor, propagate_nan=NAN)
    tl.store(range_ptr, r + momentum * (b - r))


@triton.jit
def _dsq_project_kernel(alpha_ptr, lo_ptr, hi_ptr, alpha_min, alpha_max, min_width, rel_width):
    """DSQ's projection after an optimizer step: alpha into [alpha_min, alpha_max],
    u >= l + max(min_width, rel_width max(|l|, |u|))."""
    a = tl.load(alpha_ptr)
    tl.store(alpha_ptr, tl.minimum(tl.maximum(a, alpha_min, propagate_nan=NAN), alpha_max, propagate_nan=NAN))
    lo = tl.load(lo_ptr)
    hi = tl.load(hi_ptr)
    width = tl.maximum(tl.maximum(tl.abs(lo), tl.abs(hi), propagate_nan=NAN) * rel_width, min_width,
                       propagate_nan=NAN)
    tl.store(hi_ptr, tl.maximum(hi, lo + width, propagate_nan=NAN))


# ------------------------------------------------------------------------------------------------- launchers
def levels_forward(x: torch.Tensor, src: torch.Tensor, hi: Optional[torch.Tensor], divisor: float, min_src: float,
                   qmin: int, qmax: int, code_shift: Optional[int], dsq: bool):
    """(y, int8 codes or None, affine [scale, offset]): a grid (src = step source) or DSQ (src = l, hi = u)."""
    y = torch.empty_like(x)
    codes = torch.empty_like(x, dtype=torch.int8) if code_shift is not None else None
    aff = torch.empty(4, dtype=torch.float32, device=x.device)
    n = x.numel()
    _launch(_forward_kernel, _programs(n), x, y, codes if codes is not None else y, src,
            hi if hi is not None else src, aff, n, float(divisor), float(min_src), float(qmin), float(qmax),
            float(code_shift or 0), qmin / divisor, qmax / divisor, DSQ=dsq, CODES=codes is not None, BLOCK=BLOCK)
    return y, codes, aff


def decode(codes: torch.Tensor, aff: torch.Tensor, shift: int, dtype: torch.dtype) -> torch.Tensor:
    y = torch.empty_like(codes, dtype=dtype)
    _launch(_decode_kernel, _programs(y.numel()), codes, y, aff, y.numel(), float(shift), BLOCK=BLOCK)
    return y


def grid_backward(grad: torch.Tensor, x: torch.Tensor, aff: torch.Tensor, qmin: int, qmax: int, rule: int,
                  grad_scale: float, in_place: bool):
    """(grad_x, gradient of src or None)."""
    n = x.numel()
    blocks = _programs(n)
    grad_x = grad if in_place else torch.empty_like(grad)
    partials = torch.empty(2 * blocks if rule else 1, dtype=torch.float32, device=x.device)
    _launch(_grid_backward_kernel, blocks, grad, x, grad_x, aff, partials, n, float(qmin), float(qmax),
            RULE=rule, SIGNED=qmin < 0, BLOCK=BLOCK)
    if rule == GRID_PLAIN:
        return grad_x, None
    grad_src = torch.empty((), dtype=torch.float32, device=x.device)
    _launch(_grid_finish_kernel, 1, partials, blocks, aff, grad_src, float(grad_scale), RULE=rule,
            RBLOCK=REDUCE_BLOCK)
    return grad_x, grad_src


def dsq_backward(grad: torch.Tensor, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                 alpha: torch.Tensor, levels: int, in_place: bool):
    """(grad_x, dL/dl, dL/du, dL/dalpha)."""
    n = x.numel()
    blocks = _programs(n)
    grad_x = grad if in_place else torch.empty_like(grad)
    partials = torch.empty(6 * blocks, dtype=torch.float32, device=x.device)
    _launch(_dsq_backward_kernel, blocks, grad, x, grad_x, lower, upper, alpha, partials, n, float(levels),
            BLOCK=BLOCK)
    out = torch.empty(3, dtype=torch.float32, device=x.device)
    _launch(_dsq_finish_kernel, 1, partials, blocks, lower, upper, out, float(levels), RBLOCK=128)
    grad_lower, grad_upper, grad_alpha = out.unbind()
    return grad_x, grad_lower, grad_upper, grad_alpha


def dorefa_weight_forward(t: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, peak = max|t|) of DoReFa's eq. 9 from t = tanh(w)."""
    n = t.numel()
    blocks = _programs(n)
    partials = torch.empty(blocks, dtype=torch.float32, device=t.device)
    peak = torch.empty((), dtype=torch.float32, device=t.device)
    y = torch.empty_like(t)
    _launch(_max_abs_kernel, blocks, t, partials, n, BLOCK=BLOCK)
    _launch(_peak_kernel, 1, partials, blocks, peak, RBLOCK=REDUCE_BLOCK)
    _launch(_dorefa_weight_kernel, blocks, t, y, peak, n, float(levels), BLOCK=BLOCK)
    return y, peak


def dorefa_weight_backward(grad: torch.Tensor, t: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    n = t.numel()
    blocks = _programs(n)
    partials = torch.empty(2 * blocks, dtype=torch.float32, device=t.device)
    grad_w = torch.empty_like(t)
    _launch(_dorefa_sums_kernel, blocks, grad, t, peak, partials, n, BLOCK=BLOCK)
    _launch(_dorefa_grad_kernel, blocks, grad, t, grad_w, peak, partials, blocks, n, BLOCK=BLOCK, RBLOCK=256)
    return grad_w


def ema_update(range_buffer: torch.Tensor, batch: torch.Tensor, momentum: float, floor: float) -> None:
    _launch(_ema_kernel, 1, range_buffer, batch, float(momentum), float(floor))


def dsq_project(alpha: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha_min: float, alpha_max: float,
                min_width: float, rel_width: float) -> None:
    _launch(_dsq_project_kernel, 1, alpha, lower, upper, float(alpha_min), float(alpha_max), float(min_width),
            float(rel_width))
