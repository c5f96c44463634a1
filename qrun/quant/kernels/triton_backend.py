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

from qrun.quant.kernels import result_dtype

BLOCK = 1024
REDUCE_BLOCK = 1024
# Lanes with which every program of a launch re-reduces the previous launch's per-block partials (TWN's Delta
# and alpha, DoReFa's gradient sums): each program reads all of them, blocks^2 loads in all, which for the
# layers of these networks (at most ~2,300 blocks, resnet18's 2.4M-weight convs) stays within L2.
PARTIAL_BLOCK = 256
GRID_PLAIN, GRID_LSQ, GRID_PACT = 0, 1, 2
# Clamps keep a NaN, as torch.clamp does (Triton's default drops it: a diverging value would become a level).
NAN = tl.constexpr(tl.PropagateNan.ALL)

launches = 0  # kernels launched by this process (the step-count test reads it)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(kernel, programs: int, *args, **constexprs) -> None:
    global launches
    launches += 1
    device = args[0].device
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        # Triton launches on the current device; a tensor on another GPU (a model moved to cuda:1 without
        # set_device) would be read through the wrong context.
        with torch.cuda.device(device):
            kernel[(programs,)](*args, enable_fp_fusion=False, **constexprs)
        return
    if _INTERPRET:
        # The interpreter emulates a launch with host copies of every tensor argument; those are not operations
        # of the CUDA path, so dispatch modes (the step-count test) must not see them.
        with _disable_current_modes():
            kernel[(programs,)](*args, **constexprs)
    else:
        kernel[(programs,)](*args, enable_fp_fusion=False, **constexprs)


def _input_gradient(grad: torch.Tensor, x: torch.Tensor, in_place: bool) -> torch.Tensor:
    """Where a backward writes the input gradient: over `grad` when allowed, else a new tensor in x's dtype (a
    float32 gradient of a bf16 input's float32 result is stored rounded, as autograd's cast would)."""
    return grad if in_place and grad.dtype == x.dtype else torch.empty_like(grad, dtype=x.dtype)


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
        inv = tl.math.div_rn(levels, hi - lo)  # n / (u - l) rounded once, as kernels.c's 1 / Delta
        shift = 0.5 - tl.math.div_rn(lo, scale)
        offset = lo
    else:
        src = tl.maximum(tl.load(src_ptr).to(tl.float32), min_src, propagate_nan=NAN)
        scale = tl.math.div_rn(src, divisor)
        # divisor / src rounded once (what kernels.c gets from a double 1 / step): 1 / scale would round twice, and
        # DoReFa's x = 1/2 (x * 15 = 7.5 exactly) would land on level 7 instead of round(7.5) = 8.
        inv = tl.math.div_rn(divisor, src)
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
            q = _levels(x, tl.math.div_rn(1.0, step), 0.0, qmin, qmax, False)  # divisor 1: the forward's inv
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
    inv = tl.math.div_rn(levels, hi - lo)  # as the forward's
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


# --------------------------------------------------------------------------------- xnor, twn, affine
@triton.jit
def _sign_forward_kernel(x_ptr, y_ptr, codes_ptr, aff_ptr, n, CODES: tl.constexpr, BLOCK: tl.constexpr):
    """sign with sign(0) = +1 (a NaN becomes -1, as torch.where(x >= 0, 1, -1) has it), and its int8 codes."""
    pid = tl.program_id(0)
    if pid == 0:  # the codes' decode: level * 1 + 0 (and the clip range [-1, 1] of the saturated gradient)
        tl.store(aff_ptr, 1.0)
        tl.store(aff_ptr + 1, 0.0)
        tl.store(aff_ptr + 2, -1.0)
        tl.store(aff_ptr + 3, 1.0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(x >= 0.0, 1.0, -1.0)
    _store(y_ptr + offs, y, mask)
    if CODES:
        tl.store(codes_ptr + offs, y.to(tl.int8), mask=mask)


@triton.jit
def _sign_backward_kernel(g_ptr, x_ptr, gx_ptr, n, BLOCK: tl.constexpr):
    """The saturated straight-through gradient: zero for |x| > 1 (a NaN input passes it, as hardtanh_backward)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _store(gx_ptr + offs, tl.where((x < -1.0) | (x > 1.0), 0.0, g), mask)


@triton.jit
def _xnor_weight_forward_kernel(w_ptr, y_ptr, alpha_ptr, row, row_f, RBLOCK: tl.constexpr):
    """One program per output channel: alpha = mean|W| over the channel, then W~ = +-alpha (sign(0) = +1)."""
    base = tl.program_id(0).to(tl.int64) * row
    acc = tl.zeros((RBLOCK,), dtype=tl.float32)
    for start in range(0, row, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        acc += tl.abs(tl.load(w_ptr + base + idx, mask=idx < row, other=0.0).to(tl.float32))
    alpha = tl.math.div_rn(tl.sum(acc, axis=0), row_f)
    tl.store(alpha_ptr + tl.program_id(0), alpha)
    for start in range(0, row, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        mask = idx < row
        w = tl.load(w_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        _store(y_ptr + base + idx, tl.where(w >= 0.0, alpha, -alpha), mask)


@triton.jit
def _xnor_weight_backward_kernel(g_ptr, w_ptr, gw_ptr, alpha_ptr, row, row_f, RBLOCK: tl.constexpr):
    """XNOR-Net's eq. 7 per output channel: g alpha 1_{|W| <= 1} + sgn(W) / n sum_j g_j sign(W_j), where the
    second term is the gradient through alpha = mean|W| (sgn(0) = 0 there, as abs's derivative)."""
    base = tl.program_id(0).to(tl.int64) * row
    alpha = tl.load(alpha_ptr + tl.program_id(0))
    acc = tl.zeros((RBLOCK,), dtype=tl.float32)
    for start in range(0, row, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        mask = idx < row
        g = tl.load(g_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(w >= 0.0, g, -g)
    through_alpha = tl.math.div_rn(tl.sum(acc, axis=0), row_f)
    for start in range(0, row, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        mask = idx < row
        g = tl.load(g_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        straight = tl.where((w < -1.0) | (w > 1.0), 0.0, g * alpha)
        sgn = tl.where(w > 0.0, 1.0, tl.where(w < 0.0, -1.0, 0.0))
        _store(gw_ptr + base + idx, straight + sgn * through_alpha, mask)


@triton.jit
def _abs_sum_kernel(w_ptr, part_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(part_ptr + tl.program_id(0), tl.sum(tl.abs(w), axis=0))


@triton.jit
def _sum_one(part_ptr, blocks, RBLOCK: tl.constexpr):
    """One per-block partial sum reduced in a fixed order (every program that calls it gets the same bits)."""
    acc = tl.zeros((RBLOCK,), dtype=tl.float32)
    for start in range(0, blocks, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        acc += tl.load(part_ptr + idx, mask=idx < blocks, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _ternary_sums_kernel(w_ptr, abs_part_ptr, part_ptr, delta_ptr, n, n_f, blocks, threshold_factor,
                         BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    """TWN's eq. 6 Delta = 0.7 E|W| (every program reduces the |W| partials), then the block's share of eq. 5:
    sum of |W| above Delta and how many."""
    pid = tl.program_id(0)
    delta = threshold_factor * tl.math.div_rn(_sum_one(abs_part_ptr, blocks, RBLOCK), n_f)
    if pid == 0:
        tl.store(delta_ptr, delta)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    a = tl.abs(tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32))
    above = (a > delta).to(tl.float32)  # masked elements load 0, never above a Delta >= 0
    # A product, not a select, as eq. 5's reference: a NaN or inf weight makes alpha (and the layer) NaN.
    tl.store(part_ptr + pid * 2, tl.sum(a * above, axis=0))
    tl.store(part_ptr + pid * 2 + 1, tl.sum(above, axis=0))


@triton.jit
def _ternary_kernel(w_ptr, y_ptr, part_ptr, delta_ptr, alpha_ptr, n, blocks, BLOCK: tl.constexpr,
                    RBLOCK: tl.constexpr):
    """alpha = sum_{|W| > Delta} |W| / #{|W| > Delta} (eq. 5), W~ = alpha {-1, 0, +1}."""
    pid = tl.program_id(0)
    total, count = _sum_partials(part_ptr, blocks, RBLOCK)
    alpha = tl.math.div_rn(total, tl.maximum(count, 1.0))
    delta = tl.load(delta_ptr)
    if pid == 0:
        tl.store(alpha_ptr, alpha)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _store(y_ptr + offs, alpha * ((w > delta).to(tl.float32) - (w < -delta).to(tl.float32)), mask)


@triton.jit
def _min_max_kernel(x_ptr, part_ptr, n, BLOCK: tl.constexpr):
    """The block's min and max; a NaN makes both NaN (torch.aminmax propagates it)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nan = tl.sum(((x != x) & mask).to(tl.int32), axis=0) > 0
    lo = tl.min(tl.where(mask, x, float("inf")), axis=0)
    hi = tl.max(tl.where(mask, x, float("-inf")), axis=0)
    tl.store(part_ptr + pid * 2, tl.where(nan, float("nan"), lo))
    tl.store(part_ptr + pid * 2 + 1, tl.where(nan, float("nan"), hi))


@triton.jit
def _qparams(lo, hi, qmin, qmax, eps, SYMMETRIC: tl.constexpr):
    """(scale, zero point) of the range [lo, hi] widened to contain 0: affine.asymmetric_qparams /
    symmetric_qparams operation for operation (NaN-keeping clamps, correctly rounded divisions)."""
    lo = tl.minimum(lo, 0.0, propagate_nan=NAN)
    hi = tl.maximum(hi, 0.0, propagate_nan=NAN)
    if SYMMETRIC:
        amax = tl.maximum(-lo, hi, propagate_nan=NAN)
        scale = tl.maximum(tl.math.div_rn(amax, (qmax - qmin) * 0.5), eps, propagate_nan=NAN)
        zero_point = scale * 0.0
    else:
        scale = tl.maximum(tl.math.div_rn(hi - lo, qmax - qmin), eps, propagate_nan=NAN)
        zero_point = tl.minimum(tl.maximum(qmin - _round_half_even(tl.math.div_rn(lo, scale)), qmin,
                                           propagate_nan=NAN), qmax, propagate_nan=NAN)
    return scale, zero_point


@triton.jit
def _observer_kernel(part_ptr, blocks, min_ptr, max_ptr, qp_ptr, averaging_constant, qmin, qmax, eps,
                     AVERAGE: tl.constexpr, SYMMETRIC: tl.constexpr, RBLOCK: tl.constexpr):
    """The range of this tensor (min and max of the block partials), taken as is or averaged into the stored
    one (Jacob et al. 3.1's EMA), and the (scale, zero point) of the result."""
    lo = tl.full((RBLOCK,), float("inf"), dtype=tl.float32)
    hi = tl.full((RBLOCK,), float("-inf"), dtype=tl.float32)
    for start in range(0, blocks, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        mask = idx < blocks
        lo = tl.minimum(lo, tl.load(part_ptr + idx * 2, mask=mask, other=float("inf")), propagate_nan=NAN)
        hi = tl.maximum(hi, tl.load(part_ptr + idx * 2 + 1, mask=mask, other=float("-inf")), propagate_nan=NAN)
    lo_nan = tl.sum((lo != lo).to(tl.int32), axis=0) > 0
    hi_nan = tl.sum((hi != hi).to(tl.int32), axis=0) > 0
    batch_lo = tl.where(lo_nan, float("nan"), tl.min(lo, axis=0))
    batch_hi = tl.where(hi_nan, float("nan"), tl.max(hi, axis=0))
    if AVERAGE:
        current_lo = tl.load(min_ptr)
        current_hi = tl.load(max_ptr)
        batch_lo = current_lo + averaging_constant * (batch_lo - current_lo)
        batch_hi = current_hi + averaging_constant * (batch_hi - current_hi)
    tl.store(min_ptr, batch_lo)
    tl.store(max_ptr, batch_hi)
    scale, zero_point = _qparams(batch_lo, batch_hi, qmin, qmax, eps, SYMMETRIC)
    tl.store(qp_ptr, scale)
    tl.store(qp_ptr + 1, zero_point)


@triton.jit
def _channel_observer_kernel(w_ptr, min_ptr, max_ptr, qp_ptr, row, channels, qmin, qmax, eps,
                             RBLOCK: tl.constexpr):
    """Per output channel: the channel's range and its symmetric (scale, 0); qp holds [scales..., zero points...]."""
    c = tl.program_id(0)
    base = c.to(tl.int64) * row
    lo = tl.full((RBLOCK,), float("inf"), dtype=tl.float32)
    hi = tl.full((RBLOCK,), float("-inf"), dtype=tl.float32)
    nan = tl.zeros((RBLOCK,), dtype=tl.int32)
    for start in range(0, row, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        mask = idx < row
        w = tl.load(w_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        nan += ((w != w) & mask).to(tl.int32)
        lo = tl.minimum(lo, tl.where(mask, w, float("inf")))
        hi = tl.maximum(hi, tl.where(mask, w, float("-inf")))
    has_nan = tl.sum(nan, axis=0) > 0
    lo_c = tl.where(has_nan, float("nan"), tl.min(lo, axis=0))
    hi_c = tl.where(has_nan, float("nan"), tl.max(hi, axis=0))
    tl.store(min_ptr + c, lo_c)
    tl.store(max_ptr + c, hi_c)
    scale, zero_point = _qparams(lo_c, hi_c, qmin, qmax, eps, True)
    tl.store(qp_ptr + c, scale)
    tl.store(qp_ptr + channels + c, zero_point)


@triton.jit
def _qparams_kernel(min_ptr, max_ptr, qp_ptr, channels, qmin, qmax, eps, SYMMETRIC: tl.constexpr,
                    RBLOCK: tl.constexpr):
    """(scale, zero point) of a stored range (a frozen observer, evaluation): one program for all channels."""
    for start in range(0, channels, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        mask = idx < channels
        scale, zero_point = _qparams(tl.load(min_ptr + idx, mask=mask, other=0.0),
                                     tl.load(max_ptr + idx, mask=mask, other=0.0), qmin, qmax, eps, SYMMETRIC)
        tl.store(qp_ptr + idx, scale, mask=mask)
        tl.store(qp_ptr + channels + idx, zero_point, mask=mask)


@triton.jit
def _affine_levels(x, offs, mask, qp_ptr, row, channels, PER_CHANNEL: tl.constexpr):
    """(round(x / S) + Z, Z, S) as torch.fake_quantize_per_*_affine computes it: x times the correctly rounded
    1 / S, rounded half to even; per channel, element i belongs to output channel i // row."""
    if PER_CHANNEL:
        channel = (offs // row).to(tl.int32)
        scale = tl.load(qp_ptr + channel, mask=mask, other=1.0)
        zero_point = tl.load(qp_ptr + channels + channel, mask=mask, other=0.0)
    else:
        scale = tl.load(qp_ptr)
        zero_point = tl.load(qp_ptr + 1)
    v = _round_half_even(x * tl.math.div_rn(1.0, scale)) + zero_point
    return v, zero_point, scale


@triton.jit
def _affine_forward_kernel(x_ptr, y_ptr, qp_ptr, n, row, channels, qmin, qmax, PER_CHANNEL: tl.constexpr,
                           BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v, zero_point, scale = _affine_levels(x, offs, mask, qp_ptr, row, channels, PER_CHANNEL)
    q = tl.minimum(tl.maximum(v, qmin, propagate_nan=NAN), qmax, propagate_nan=NAN)
    _store(y_ptr + offs, (q - zero_point) * scale, mask)


@triton.jit
def _affine_backward_kernel(g_ptr, x_ptr, gx_ptr, qp_ptr, n, row, channels, qmin, qmax,
                            PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    """The gradient where qmin <= round(x / S) + Z <= qmax, zero elsewhere (the fake-quantize cache mask)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v, _, _ = _affine_levels(x, offs, mask, qp_ptr, row, channels, PER_CHANNEL)
    # g times the mask, as torch's backward: a non-finite gradient on a clipped element stays NaN there.
    _store(gx_ptr + offs, g * ((v >= qmin) & (v <= qmax)).to(tl.float32), mask)


# ------------------------------------------------------------------------------------------------- launchers
def levels_forward(x: torch.Tensor, src: torch.Tensor, hi: Optional[torch.Tensor], divisor: float, min_src: float,
                   qmin: int, qmax: int, code_shift: Optional[int], dsq: bool):
    """(y, int8 codes or None, affine [scale, offset]): a grid (src = step source) or DSQ (src = l, hi = u)."""
    y = torch.empty_like(x, dtype=result_dtype(x))
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
    grad_x = _input_gradient(grad, x, in_place)
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
    grad_x = _input_gradient(grad, x, in_place)
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
    _launch(_dorefa_grad_kernel, blocks, grad, t, grad_w, peak, partials, blocks, n, BLOCK=BLOCK,
            RBLOCK=PARTIAL_BLOCK)
    return grad_w


def ema_update(range_buffer: torch.Tensor, batch: torch.Tensor, momentum: float, floor: float) -> None:
    _launch(_ema_kernel, 1, range_buffer, batch, float(momentum), float(floor))


def dsq_project(alpha: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha_min: float, alpha_max: float,
                min_width: float, rel_width: float) -> None:
    _launch(_dsq_project_kernel, 1, alpha, lower, upper, float(alpha_min), float(alpha_max), float(min_width),
            float(rel_width))


def sign_forward(x: torch.Tensor, compact: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(sign(x) with sign(0) = +1, int8 codes or None, the codes' affine [1, 0])."""
    y = torch.empty_like(x, dtype=result_dtype(x))
    codes = torch.empty_like(x, dtype=torch.int8) if compact else None
    aff = torch.empty(4, dtype=torch.float32, device=x.device)
    n = x.numel()
    _launch(_sign_forward_kernel, _programs(n), x, y, codes if compact else y, aff, n, CODES=compact, BLOCK=BLOCK)
    return y, codes, aff


def sign_backward(grad: torch.Tensor, x: torch.Tensor, in_place: bool) -> torch.Tensor:
    grad_x = _input_gradient(grad, x, in_place)
    n = x.numel()
    _launch(_sign_backward_kernel, _programs(n), grad, x, grad_x, n, BLOCK=BLOCK)
    return grad_x


def xnor_weight_forward(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(+-alpha per output channel, alpha as a float32 vector). Each output channel is one contiguous stretch of
    memory in NCHW and in channels_last alike, which is all the per-channel kernels need."""
    channels = w.shape[0]
    y = torch.empty_like(w)
    alpha = torch.empty(channels, dtype=torch.float32, device=w.device)
    row = w.numel() // channels
    _launch(_xnor_weight_forward_kernel, channels, w, y, alpha, row, float(row), RBLOCK=REDUCE_BLOCK)
    return y, alpha


def xnor_weight_backward(grad: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    channels = w.shape[0]
    grad_w = torch.empty_like(w)
    row = w.numel() // channels
    _launch(_xnor_weight_backward_kernel, channels, grad, w, grad_w, alpha, row, float(row), RBLOCK=REDUCE_BLOCK)
    return grad_w


def ternary_forward(w: torch.Tensor, threshold_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha {-1, 0, +1}, [Delta, alpha]) of TWN for one layer: three launches, no host read."""
    n = w.numel()
    blocks = _programs(n)
    abs_partials = torch.empty(blocks, dtype=torch.float32, device=w.device)
    partials = torch.empty(2 * blocks, dtype=torch.float32, device=w.device)
    delta_alpha = torch.empty(2, dtype=torch.float32, device=w.device)
    y = torch.empty_like(w)
    _launch(_abs_sum_kernel, blocks, w, abs_partials, n, BLOCK=BLOCK)
    _launch(_ternary_sums_kernel, blocks, w, abs_partials, partials, delta_alpha, n, float(n), blocks,
            float(threshold_factor), BLOCK=BLOCK, RBLOCK=PARTIAL_BLOCK)
    _launch(_ternary_kernel, blocks, w, y, partials, delta_alpha, delta_alpha[1:], n, blocks, BLOCK=BLOCK,
            RBLOCK=PARTIAL_BLOCK)
    return y, delta_alpha


def affine_observe(x: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor, average: bool,
                   averaging_constant: float, qmin: int, qmax: int, eps: float, symmetric: bool,
                   per_channel: bool) -> torch.Tensor:
    """Update the range buffers in place from x (per output channel, or per tensor, averaged when `average`) and
    return their (scale, zero point) as [scales..., zero points...] in float32."""
    if per_channel:
        channels = x.shape[0]
        qp = torch.empty(2 * channels, dtype=torch.float32, device=x.device)
        _launch(_channel_observer_kernel, channels, x, min_val, max_val, qp, x.numel() // channels, channels,
                float(qmin), float(qmax), float(eps), RBLOCK=REDUCE_BLOCK)
        return qp
    n = x.numel()
    blocks = _programs(n)
    partials = torch.empty(2 * blocks, dtype=torch.float32, device=x.device)
    qp = torch.empty(2, dtype=torch.float32, device=x.device)
    _launch(_min_max_kernel, blocks, x, partials, n, BLOCK=BLOCK)
    _launch(_observer_kernel, 1, partials, blocks, min_val, max_val, qp, float(averaging_constant), float(qmin),
            float(qmax), float(eps), AVERAGE=average, SYMMETRIC=symmetric, RBLOCK=REDUCE_BLOCK)
    return qp


def affine_qparams(min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int, eps: float,
                   symmetric: bool) -> torch.Tensor:
    channels = min_val.numel()
    qp = torch.empty(2 * channels, dtype=torch.float32, device=min_val.device)
    _launch(_qparams_kernel, 1, min_val, max_val, qp, channels, float(qmin), float(qmax), float(eps),
            SYMMETRIC=symmetric, RBLOCK=REDUCE_BLOCK)
    return qp


def affine_forward(x: torch.Tensor, qp: torch.Tensor, qmin: int, qmax: int, per_channel: bool) -> torch.Tensor:
    y = torch.empty_like(x, dtype=result_dtype(x))
    n = x.numel()
    channels = qp.numel() // 2
    _launch(_affine_forward_kernel, _programs(n), x, y, qp, n, n // channels, channels, float(qmin), float(qmax),
            PER_CHANNEL=per_channel, BLOCK=BLOCK)
    return y


def affine_backward(grad: torch.Tensor, x: torch.Tensor, qp: torch.Tensor, qmin: int, qmax: int, per_channel: bool,
                    in_place: bool) -> torch.Tensor:
    grad_x = _input_gradient(grad, x, in_place)
    n = x.numel()
    channels = qp.numel() // 2
    _launch(_affine_backward_kernel, _programs(n), grad, x, grad_x, qp, n, n // channels, channels, float(qmin),
            float(qmax), PER_CHANNEL=per_channel, BLOCK=BLOCK)
    return grad_x
