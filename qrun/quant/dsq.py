"""Differentiable Soft Quantization (Gong et al., ICCV 2019), with learned alpha, lower (l) and upper (u).

Equations (section 3.2 of the paper), with n = 2^b - 1 intervals:
    clip x to [l, u];  Delta = (u - l) / n;  interval i = floor((x - l) / Delta) in [0, n - 1]
    m_i = l + (i + 1/2) Delta;  phi(x) = s tanh(k (x - m_i)),  s = 1 / (1 - alpha),  k = log(2/alpha - 1) / Delta
    Q(x) = l + Delta (i + (sgn(phi(x)) + 1) / 2)                                           (eq. 3 with sgn)
Forward is the hard Q (so exactly 2^b levels); backward goes straight through sgn into phi, which gives x, l, u
and alpha their gradients (without the straight-through sgn, training goes NaN, as seed 000 found).

Closed forms used by the backward, with r = (x - l) / Delta, f = r - i - 1/2 in [-1/2, 1/2], c = log(2/alpha - 1),
t = tanh(c f), q = i + (sgn f + 1)/2 the output level, D = (s c / 2)(1 - t^2):
    dQ/dx     = D                              inside [l, u]; 0 outside (clipped)
    dQ/dDelta = q - D r                        (l held fixed)
    dQ/dl     = 1 - D - (q - D r) / n,   dQ/du = (q - D r) / n       inside
    dQ/dl     = 1 (x < l),               dQ/du = 1 (x > u)           outside: the bounds really clip
    dQ/dalpha = (Delta / 2) (s^2 t - s (1 - t^2) 2 f / (alpha (2 - alpha)))
Because Q(x) = l + Delta F(r): dQ/dl + dQ/du = 1 - dQ/dx, so the l gradient is a by-product of the u gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.autograd import Function

from qrun.quant import kernels
from qrun.quant.kernels import device
from qrun.quant.base import IntegerGrid, Quantizer, register_quantizer
from qrun.quant.ste import Codes, above, affine_levels, below, encode, fused_levels, int8_shift, scalar, with_codes
from qrun.quant.uniform import RangeObserver

ALPHA_INIT = 0.2  # section 4 of the paper
ALPHA_MIN, ALPHA_MAX = 1e-4, 0.5  # alpha lives in (0, 0.5]; 1e-4 keeps log(2/alpha - 1) finite
MIN_WIDTH = 1e-6  # smallest u - l we let the optimizer reach near 0
# ... and relative to the bounds' size: an absolute 1e-6 is below float32 resolution once |l| > 32 (u == l, and
# Delta = 0 divides by zero in the next forward).
MIN_REL_WIDTH = 1e-3


def min_width(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Smallest u - l kept by the projection: 1e-3 of max(|l|, |u|), at least MIN_WIDTH (tensor ops, no sync)."""
    return torch.maximum(lower.abs(), upper.abs()).mul(MIN_REL_WIDTH).clamp_(min=MIN_WIDTH)


class _ScaleGrad(Function):
    """Identity forward; multiplies the gradient by `scale` (LSQ's gradient scale, section 2.2)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def dsq_levels(x: torch.Tensor, lower: float, upper: float, levels: int) -> torch.Tensor:
    """q = floor((clip(x) - l) / Delta + 1/2) in [0, n] as floats: i + (sgn(phi) + 1)/2 with ties up (sgn(0) = +1)."""
    delta = (upper - lower) / levels
    # (x - l)/Delta + 1/2 as one fused pass: a 0-d tensor plus alpha * x.
    shift = torch.tensor(0.5 - lower / delta, dtype=x.dtype, device=x.device)
    return torch.add(shift, x, alpha=1.0 / delta).floor_().clamp_(0, levels)


def dsq_hard(x: torch.Tensor, lower: float, upper: float, levels: int) -> torch.Tensor:
    """Q(x) = l + Delta q: the hard DSQ output, exactly on the grid of 2^b levels."""
    return affine_levels(dsq_levels(x, lower, upper, levels), (upper - lower) / levels, lower)


def dsq_soft(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor,
             levels: int) -> torch.Tensor:
    """The soft quantizer Q_S(x) = l + Delta (i + (phi(x) + 1) / 2) of eq. 3, a plain autograd composition.

    Not used for training (too slow, and not exactly on the grid); it documents the curve whose derivative the
    straight-through backward uses, and lets tests check that alpha -> 0 turns it into rounding.
    """
    delta = (upper - lower) / levels
    xc = torch.minimum(torch.maximum(x, lower), upper)
    i = torch.floor((xc - lower) / delta).clamp(0, levels - 1).detach()
    centre = lower + (i + 0.5) * delta
    s = 1.0 / (1.0 - alpha)
    k = torch.log(2.0 / alpha - 1.0) / delta
    phi = s * torch.tanh(k * (xc - centre))
    return lower + delta * (i + (phi + 1.0) / 2.0)


class _DSQFunction(Function):
    """Hard DSQ forward; backward through phi (see the module docstring).

    Saves x only (the preceding ReLU keeps it anyway): q, r, f and t are recomputed in backward. With `compact`
    the output carries its level codes so the next conv saves q (1 byte per element) instead of the float output.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor,
                levels: int, compact: bool, grad_in_place: bool):
        lo, hi, a = scalar(lower), scalar(upper), scalar(alpha)
        ctx.save_for_backward(x)
        ctx.constants = (lo, hi, a, levels, grad_in_place)
        if levels <= 255 and kernels.usable(x) is not None:
            return dsq_forward_fused(x, lo, hi, levels, compact)
        delta = (hi - lo) / levels
        q = dsq_levels(x, lo, hi, levels)
        codes = None
        if compact:
            packed, shift = encode(q, 0, levels)
            codes = Codes(packed, delta, lo, x.dtype, shift)
        return affine_levels(q, delta, lo), codes  # decode(codes) repeats exactly this operation

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _codes_grad: object):
        (x,) = ctx.saved_tensors
        lo, hi, alpha, levels, in_place = ctx.constants
        grads = dsq_backward_fused(grad, x, lo, hi, alpha, levels, in_place) if levels <= 255 else None
        if grads is None:
            grads = dsq_backward(grad, x, dsq_levels(x, lo, hi, levels), lo, hi, alpha, levels)
        return *grads, None, None, None


def dsq_forward_fused(x: torch.Tensor, lo: float, hi: float, levels: int,
                      compact: bool) -> tuple[torch.Tensor, Optional[Codes]]:
    """kernels.c's one-pass forward: the same levels as `dsq_levels`, and y = l + Delta q."""
    delta = (hi - lo) / levels
    return fused_levels(x, 1.0 / delta, 0, levels, delta, lo, int8_shift(0, levels), compact,
                        floor_shift=0.5 - lo / delta)


def dsq_backward_fused(grad: torch.Tensor, x: torch.Tensor, lo: float, hi: float, alpha: float, levels: int,
                       in_place: bool) -> Optional[tuple[torch.Tensor, ...]]:
    """`dsq_backward` as one kernels.c pass (levels recomputed from x), or None when it cannot take the tensors."""
    lib = kernels.usable(x, grad)
    if lib is None:
        return None
    delta = (hi - lo) / levels
    s = 1.0 / (1.0 - alpha)
    c = math.log(2.0 / alpha - 1.0)
    grad_x = grad if in_place else torch.empty_like(grad)
    sums = kernels.Sums(6)
    lib.qrun_dsq_backward(grad.data_ptr(), x.data_ptr(), grad_x.data_ptr(), x.numel(), below(lo, x.dtype),
                          above(hi, x.dtype), hi, 1.0 / delta, 0.5 - lo / delta, levels, lo / delta, c, 2.0 * s * c,
                          s * s, -4.0 * s / (c * alpha * (2.0 - alpha)), sums.address, kernels.threads(x.numel()))
    return (grad_x, *(grad.new_tensor(value) for value in range_gradients([sums[i] for i in range(6)], lo, delta,
                                                                          levels)))


def range_gradients(totals, lo: float, delta: float, levels: int) -> tuple:
    """(dL/dl, dL/du, dL/dalpha) from the backward's six sums (floats or 0-d tensors alike)."""
    sum_g, sum_above_u, sum_gin_q, sum_gx, sum_gx_x, signed_h = totals
    # u: sum_{x > u} g + (1/n) sum_in g (q - D r), with r = (x - l)/Delta.
    grad_upper = sum_above_u + (sum_gin_q - (sum_gx_x - lo * sum_gx) / delta) / levels
    grad_lower = sum_g - sum_gx - grad_upper
    return grad_lower, grad_upper, signed_h * (delta / 2.0)


# The device path's reference (what CUDA runs where Triton cannot, and what the Triton kernels are tested
# against): the same equations with l, u, alpha as 0-d tensors, computed in float32, one rounding per operation.
def _reference_grid(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, levels: int):
    lo, hi = lower.detach().float(), upper.detach().float()
    delta = (hi - lo) / torch.full_like(hi, levels)  # by a tensor: see ste.grid_reference_forward
    inv = torch.full_like(hi, levels) / (hi - lo)  # rounded once, as kernels.c's 1 / Delta
    q = torch.mul(x.float(), inv).add_(0.5 - lo / delta).floor_().clamp_(0, levels)
    return q, lo, hi, delta, inv


def dsq_reference_forward(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, levels: int,
                          code_shift: Optional[int]) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(Q(x) = l + Delta q, int8 codes q - code_shift or None, [Delta, l, l, u])."""
    q, lo, hi, delta, _ = _reference_grid(x, lower, upper, levels)
    codes = None if code_shift is None else torch.sub(q, code_shift).to(torch.int8)
    return torch.mul(q, delta).add_(lo).to(x.dtype), codes, torch.stack([delta, lo, lo, hi])


def dsq_reference_backward(grad: torch.Tensor, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                           alpha: torch.Tensor, levels: int) -> tuple[torch.Tensor, ...]:
    """(dL/dx, dL/dl, dL/du, dL/dalpha) from the closed forms of the module docstring."""
    g, xf = grad.float(), x.float()
    q, lo, hi, delta, inv = _reference_grid(x, lower, upper, levels)
    a = alpha.detach().float()
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    g_in = torch.where((xf >= lo) & (xf <= hi), g, zero)
    r = torch.mul(xf, inv) - lo / delta  # (x - l) / Delta
    d = (q - torch.mul(xf, inv)) + lo / delta  # q - r = -f + sgn(f)/2: sgn(d) = sgn(f), |f| = 1/2 - |d|
    f_abs = 0.5 - d.abs()
    s, c = 1.0 / (1.0 - a), torch.log(2.0 / a - 1.0)
    t_abs = torch.tanh(c * f_abs)
    big_d = (s * c / 2.0) * (1.0 - t_abs * t_abs)
    grad_x = g_in * big_d
    grad_upper = torch.where(xf > hi, g, zero).sum() + (g_in * (q - big_d * r)).sum() / levels
    grad_lower = g.sum() - grad_x.sum() - grad_upper
    dq_dalpha = s * s * t_abs - s * (1.0 - t_abs * t_abs) * 2.0 * f_abs / (a * (2.0 - a))
    grad_alpha = (delta / 2.0) * torch.where(d > 0, g_in * dq_dalpha, -g_in * dq_dalpha).sum()
    return grad_x.to(grad.dtype), grad_lower, grad_upper, grad_alpha


# Backward works through the tensor in chunks: its ~20 elementwise passes then stay in cache instead of streaming
# ten activation-sized temporaries through memory (measured ~3x faster on the 2-core CPU than whole tensors).
CHUNK = 1 << 19


def _flat(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """1-D views in memory order (NCHW- or channels_last-contiguous alike), copying only mixed layouts."""
    if all(t.is_contiguous() for t in tensors):
        return [t.view(-1) for t in tensors]
    if all(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        return [t.permute(0, 2, 3, 1).reshape(-1) for t in tensors]
    return [t.contiguous().view(-1) for t in tensors]


def _same_layout(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() for t in tensors) or all(
        t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in tensors)


def dsq_backward(grad: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, lo: float, hi: float, alpha: float,
                 levels: int, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of Q w.r.t. x, l, u, alpha given dL/dQ and the levels q (floats, or codes with q = codes + shift).

    The eager path (GPU, float64, odd layouts); `dsq_backward_fused` computes the same in one pass on CPU."""
    delta = (hi - lo) / levels
    s = 1.0 / (1.0 - alpha)
    c = math.log(2.0 / alpha - 1.0)
    if not _same_layout(grad, x, codes):
        grad, x, codes = grad.contiguous(), x.contiguous(), codes.contiguous()
    g_flat, x_flat, codes_flat = _flat(grad, x, codes)
    grad_x = torch.empty_like(grad)  # same layout as grad, so its flat view below is a view, not a copy
    (gx_flat,) = _flat(grad_x)
    size = min(CHUNK, g_flat.numel())
    q, g_in, d, a, p, pq = (torch.empty(size, dtype=grad.dtype, device=grad.device) for _ in range(6))
    lo_b, hi_a = below(lo, x.dtype), above(hi, x.dtype)
    sums: list[torch.Tensor] = []
    for start in range(0, g_flat.numel(), size):
        n = min(size, g_flat.numel() - start)
        g_c, x_c, gx = g_flat[start:start + n], x_flat[start:start + n], gx_flat[start:start + n]
        sums.extend(_dsq_chunk(g_c, x_c, codes_flat[start:start + n], gx, q[:n], g_in[:n], d[:n], a[:n], p[:n],
                               pq[:n], lo, hi, lo_b, hi_a, delta, s, c, alpha, shift))
    totals = torch.stack(sums).view(-1, 6).double().sum(0)
    grad_lower, grad_upper, grad_alpha = range_gradients(totals.unbind(), lo, delta, levels)
    dtype = grad.dtype
    return grad_x, grad_lower.to(dtype), grad_upper.to(dtype), grad_alpha.to(dtype)


def _dsq_chunk(g: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, grad_x: torch.Tensor, q: torch.Tensor,
               g_in: torch.Tensor, d: torch.Tensor, a: torch.Tensor, p: torch.Tensor, pq: torch.Tensor,
               lo: float, hi: float, lo_b: float, hi_a: float, delta: float, s: float, c: float,
               alpha: float, shift: int) -> list[torch.Tensor]:
    """One chunk: writes grad_x, returns its partial sums; q..pq are scratch buffers."""
    c_t = torch.tensor(c, dtype=x.dtype, device=x.device)
    q.copy_(codes)
    if shift:
        q.add_(shift)
    torch.ops.aten.hardtanh_backward.grad_input(g, x, lo_b, hi_a, grad_input=g_in)  # g inside [l, u]
    sum_gin_q = torch.dot(g_in, q)
    # d = q - r = -f + 1/2 sgn(f): its sign is the sign of f (the interval half x lies in); |f| = 1/2 - |d|.
    torch.add(q, x, alpha=-1.0 / delta, out=d).add_(lo / delta)
    torch.add(c_t, torch.abs(d, out=a), alpha=-2.0 * c, out=a)  # a = c - 2c|d| = 2 c |f|
    # With p = sigmoid(2 c |f|): |t| = 2p - 1 and 1 - t^2 = 4 p (1 - p); sigmoid is ~3x cheaper than tanh here.
    torch.sigmoid(a, out=p)
    torch.addcmul(p, p, p, value=-1.0, out=pq)  # p (1 - p)
    torch.mul(g_in, pq, out=grad_x).mul_(2.0 * s * c)  # g * D
    sum_gx, sum_gx_x = grad_x.sum(), torch.dot(grad_x, x)
    # alpha: sgn(f) [s^2 |t| - s (1 - t^2) 2 |f| / (alpha (2 - alpha))], the 2|f| being a / c.
    h = pq.mul_(a).mul_(-4.0 * s / (c * alpha * (2.0 - alpha))).add_(p, alpha=2.0 * s * s).sub_(s * s).mul_(g_in)
    # sum of sgn(f) h = 2 sum_{f > 0} h - sum h; f > 0 exactly where d > 0 (d = 0 sits at f = -1/2).
    signed_h = 2.0 * torch.ops.aten.threshold_backward.grad_input(h, d, 0.0, grad_input=a).sum() - h.sum()
    sum_above_u = torch.ops.aten.threshold_backward.grad_input(g, x, hi, grad_input=a).sum()
    return [g.sum(), sum_above_u, sum_gin_q, sum_gx, sum_gx_x, signed_h]


@register_quantizer
class DSQQuantizer(Quantizer):
    name = "dsq"
    takes_low_precision = True  # the Triton passes read bf16/fp16 and compute in float32
    min_bits, max_bits = 1, 16

    def __init__(self, bits: int, kind: str, alpha: float = ALPHA_INIT, grad_scale: bool = False) -> None:
        """alpha: initial value of the characteristic variable (0.2 in the paper), kept in (0, 0.5].

        grad_scale: multiply the l/u gradients by g = 1/sqrt(N n) (N elements per tensor for weights, per sample
        for activations; n intervals), as LSQ scales its step. The raw dQ/dl, dQ/du are sums over all N elements:
        SGD steps moved a resnet18 weight bound by 0.47x its range at lr 0.01, a resnet20 one by 15x at lr 0.1
        (scripts/dsq_bound_steps.py), enough to cross u and l; scaled, bounds move relative to their range
        about as much as weights do.
        configs/quant/dsq.yaml turns it on; off gives the paper's equations exactly (what the gradient tests check).
        """
        super().__init__(bits, kind)
        self.grad_scale = bool(grad_scale)
        self.levels = 2**self.bits - 1
        self.alpha = nn.Parameter(torch.tensor(min(max(float(alpha), ALPHA_MIN), ALPHA_MAX)))
        # l/u are placeholders until calibration: weights from the weight tensor, activations from data.
        self.lower = nn.Parameter(torch.tensor(0.0))
        self.upper = nn.Parameter(torch.tensor(1.0))
        self._observer = RangeObserver()

    def observe(self, x: torch.Tensor) -> None:
        self._observer.update(x)

    def finish_calibration(self) -> None:
        if not self._observer:
            return
        lo, hi = self._observer.min(), self._observer.max()
        with torch.no_grad():
            self.lower.fill_(lo)
            self.upper.fill_(max(hi, lo + MIN_WIDTH))
        self._observer = RangeObserver()
        super().finish_calibration()

    @torch.no_grad()
    def _project(self) -> None:
        """Projected gradient descent: after each optimizer step, bring alpha back into (0, 0.5] and keep u > l."""
        self.alpha.clamp_(ALPHA_MIN, ALPHA_MAX)
        if scalar(self.upper) - scalar(self.lower) < MIN_WIDTH:
            self.upper.copy_(self.lower + MIN_WIDTH)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        self.ensure_initialized(x)
        compact = self.kind == "act" and torch.is_grad_enabled()
        if kernels.device_path(x):  # l, u, alpha stay on the device, projection included
            if self.training:  # the relative widening is part of the one projection launch
                device.dsq_project(self.alpha, self.lower, self.upper, ALPHA_MIN, ALPHA_MAX, MIN_WIDTH, MIN_REL_WIDTH)
            lower, upper = self._scaled_bounds(x)
            return device.dsq_quantize(x, lower, upper, self.alpha, self.levels, compact, self.grad_in_place)
        if self.training:
            self._widen()
            self._project()
        lower, upper = self._scaled_bounds(x)
        return with_codes(*_DSQFunction.apply(x, lower, upper, self.alpha, self.levels, compact,
                                              self.grad_in_place))

    @torch.no_grad()
    def _widen(self) -> None:
        """u >= l + 1e-3 max(|l|, |u|) (tensor ops, no host sync), before the absolute projection."""
        self.upper.copy_(torch.maximum(self.upper, self.lower + min_width(self.lower, self.upper)))

    def _scaled_bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """l and u, with their gradients scaled by 1/sqrt(N n) when grad_scale is on (after the projection)."""
        if not (self.grad_scale and torch.is_grad_enabled()):
            return self.lower, self.upper
        scale = 1.0 / math.sqrt((x.numel() if self.kind == "weight" else x[0].numel()) * self.levels)
        return _ScaleGrad.apply(self.lower, scale), _ScaleGrad.apply(self.upper, scale)

    def learned_values(self) -> dict[str, float]:
        return {"alpha": scalar(self.alpha), "lower": scalar(self.lower), "upper": scalar(self.upper)}

    def integer_grid(self, y: torch.Tensor) -> IntegerGrid:
        lower, upper = self.lower.detach(), self.upper.detach()
        delta = (upper - lower) / self.levels
        if self.kind == "weight":  # l + Delta q = (l + u) / 2 + (Delta / 2)(2 q - n): offset ~0 for weights
            return IntegerGrid(delta / 2.0, (lower + upper) / 2.0, self.levels)
        return IntegerGrid(delta, lower, self.levels)  # l ~ 0 after a ReLU
