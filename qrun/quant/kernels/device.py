"""The device path: quantizer passes whose scalars stay 0-d device tensors, so a training step never syncs.

Each pass runs on the Triton backend when it can take the tensors (kernels.triton_usable) and on the eager tensor
reference otherwise (the functions named *_reference in ste.py, dsq.py and dorefa.py, which hold the maths).
In eager mode the passes are autograd Functions (low overhead, compact codes for the next layer's saved input,
in-place input gradients); under torch.compile they are torch.library custom ops with fake implementations, so
dynamo traces them without a graph break (the compact save, a saved_tensors_hook, is off there).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import Function

from qrun.quant import kernels
from qrun.quant.ste import (
    GRID_LSQ, GRID_PACT, GRID_PLAIN, Codes, grid_reference_backward, grid_reference_forward, int8_shift, with_codes,
)

__all__ = ["GRID_LSQ", "GRID_PACT", "GRID_PLAIN", "affine_quantize", "decode", "dorefa_weight", "dsq_project",
           "dsq_quantize", "ema_update", "grid_quantize", "sign", "ternary_weight", "xnor_weight"]


AFFINE = 4  # [scale, offset, clip low, clip high]: what a forward hands its backward and its codes' decode


def _triton():
    from qrun.quant.kernels import triton_backend

    return triton_backend


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ------------------------------------------------------------------------------------------------ the passes
def _levels_forward(x: Tensor, src: Tensor, hi: Optional[Tensor], divisor: float, min_src: float, qmin: int,
                    qmax: int, code_shift: Optional[int], dsq: bool):
    if kernels.triton_usable(x):
        return _triton().levels_forward(x, src, hi, divisor, min_src, qmin, qmax, code_shift, dsq)
    if dsq:
        from qrun.quant.dsq import dsq_reference_forward

        return dsq_reference_forward(x, src, hi, qmax, code_shift)
    return grid_reference_forward(x, src, divisor, min_src, qmin, qmax, code_shift)


def _grid_backward(grad: Tensor, x: Tensor, aff: Tensor, qmin: int, qmax: int, rule: int, grad_scale: float,
                   in_place: bool):
    if kernels.triton_usable(x, grad):
        return _triton().grid_backward(grad, x, aff, qmin, qmax, rule, grad_scale, in_place)
    grad_x, grad_src = grid_reference_backward(grad, x, aff, qmin, qmax, rule, grad_scale)
    return grad_x.to(x.dtype), grad_src


def _dsq_backward(grad: Tensor, x: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor, levels: int, in_place: bool):
    if kernels.triton_usable(x, grad):
        return _triton().dsq_backward(grad, x, lower, upper, alpha, levels, in_place)
    from qrun.quant.dsq import dsq_reference_backward

    grad_x, *grads = dsq_reference_backward(grad, x, lower, upper, alpha, levels)
    return grad_x.to(x.dtype), *grads


def _dorefa_forward(w: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.tanh(w)
    if kernels.triton_usable(t):
        return (*_triton().dorefa_weight_forward(t, levels), t)
    from qrun.quant.dorefa import dorefa_weight_reference

    return (*dorefa_weight_reference(t, levels), t)


def _dorefa_backward(grad: Tensor, t: Tensor, peak: Tensor) -> Tensor:
    if kernels.triton_usable(t, grad):
        return _triton().dorefa_weight_backward(grad, t, peak)
    from qrun.quant.dorefa import dorefa_weight_reference_backward

    return dorefa_weight_reference_backward(grad, t, peak)


def decode(codes: Tensor, aff: Tensor, shift: int, dtype: torch.dtype) -> Tensor:
    """The forward output back from its codes, bit-exactly: level * aff[0] + aff[1]."""
    if kernels.triton_device(codes.device, dtype):
        return _triton().decode(codes, aff, shift, dtype)
    return torch.add(codes.float(), shift).mul_(aff[0]).add_(aff[1]).to(dtype)


def ema_update(range_buffer: Tensor, batch: Tensor, momentum: float, floor: float) -> None:
    """range <- range + momentum (max(batch, floor) - range), in place, without reading either on the host."""
    if not _compiling() and kernels.triton_usable(range_buffer):
        _triton().ema_update(range_buffer, batch, momentum, floor)
        return
    with torch.no_grad():
        range_buffer.add_(torch.mul(batch.to(range_buffer.dtype).clamp(min=floor) - range_buffer, momentum))


def dsq_project(alpha: Tensor, lower: Tensor, upper: Tensor, alpha_min: float, alpha_max: float,
                min_width: float, rel_width: float = 0.0) -> None:
    """DSQ's projection in place: alpha into [alpha_min, alpha_max], u >= l + max(min_width, rel_width max(|l|, |u|))
    (one launch on the Triton path)."""
    if not _compiling() and kernels.triton_usable(alpha):
        _triton().dsq_project(alpha, lower, upper, alpha_min, alpha_max, min_width, rel_width)
        return
    with torch.no_grad():
        alpha.clamp_(alpha_min, alpha_max)
        width = torch.maximum(lower.abs(), upper.abs()).mul(rel_width).clamp_(min=min_width)
        upper.copy_(torch.maximum(upper, lower + width))


# ------------------------------------------------------------------------------------ eager: autograd Functions
class _GridFunction(Function):
    @staticmethod
    def forward(ctx, x: Tensor, src: Tensor, divisor: float, min_src: float, qmin: int, qmax: int, rule: int,
                grad_scale: float, compact: bool, grad_in_place: bool):
        shift = int8_shift(qmin, qmax) if compact else None
        y, codes, aff = _levels_forward(x, src, None, divisor, min_src, qmin, qmax, shift, dsq=False)
        # src itself is not saved: uniform's range moves in place each step; aff holds what backward needs.
        ctx.save_for_backward(x, aff)
        ctx.constants = (qmin, qmax, rule, grad_scale, grad_in_place)
        ctx.src_meta = (src.dtype, src.shape)
        return y, (None if codes is None else Codes(codes, 1.0, 0.0, y.dtype, shift, affine=aff))

    @staticmethod
    def backward(ctx, grad: Tensor, _codes_grad: object):
        x, aff = ctx.saved_tensors
        grad_x, grad_src = _grid_backward(grad, x, aff, *ctx.constants)
        if grad_src is not None and ctx.needs_input_grad[1]:
            grad_src = grad_src.to(ctx.src_meta[0]).reshape(ctx.src_meta[1])
        else:
            grad_src = None
        return grad_x, grad_src, None, None, None, None, None, None, None, None


class _DSQFunction(Function):
    @staticmethod
    def forward(ctx, x: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor, levels: int, compact: bool,
                grad_in_place: bool):
        shift = int8_shift(0, levels) if compact else None
        y, codes, aff = _levels_forward(x, lower, upper, 1.0, -math.inf, 0, levels, shift, dsq=True)
        ctx.save_for_backward(x, lower, upper, alpha)
        ctx.constants = (levels, grad_in_place)
        return y, (None if codes is None else Codes(codes, 1.0, 0.0, y.dtype, shift, affine=aff))

    @staticmethod
    def backward(ctx, grad: Tensor, _codes_grad: object):
        x, lower, upper, alpha = ctx.saved_tensors
        levels, in_place = ctx.constants
        grad_x, *grads = _dsq_backward(grad, x, lower, upper, alpha, levels, in_place)
        grad_l, grad_u, grad_a = (g.to(p.dtype).reshape(p.shape) for g, p in zip(grads, (lower, upper, alpha)))
        return grad_x, grad_l, grad_u, grad_a, None, None, None


class _DoReFaWeightFunction(Function):
    @staticmethod
    def forward(ctx, w: Tensor, levels: int) -> Tensor:
        y, peak, t = _dorefa_forward(w, levels)
        ctx.save_for_backward(t, peak)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        t, peak = ctx.saved_tensors
        return _dorefa_backward(grad, t, peak), None


# --------------------------------------------------------------------------- torch.compile: custom ops
@torch.library.custom_op("qrun::grid_quantize", mutates_args=())
def _grid_op(x: Tensor, src: Tensor, divisor: float, min_src: float, qmin: int, qmax: int, rule: int,
             grad_scale: float) -> tuple[Tensor, Tensor]:
    y, _, aff = _levels_forward(x, src, None, divisor, min_src, qmin, qmax, None, dsq=False)
    return y, aff


@_grid_op.register_fake
def _(x, src, divisor, min_src, qmin, qmax, rule, grad_scale):
    return torch.empty_like(x), x.new_empty(AFFINE, dtype=torch.float32)


@torch.library.custom_op("qrun::grid_quantize_backward", mutates_args=())
def _grid_backward_op(grad: Tensor, x: Tensor, aff: Tensor, qmin: int, qmax: int, rule: int,
                      grad_scale: float) -> tuple[Tensor, Tensor]:
    grad_x, grad_src = _grid_backward(grad, x, aff, qmin, qmax, rule, grad_scale, False)
    return grad_x, (torch.zeros((), dtype=torch.float32, device=x.device) if grad_src is None else grad_src)


@_grid_backward_op.register_fake
def _(grad, x, aff, qmin, qmax, rule, grad_scale):
    return torch.empty_like(grad), grad.new_empty((), dtype=torch.float32)


def _grid_setup(ctx, inputs, output) -> None:
    x, src, _, _, qmin, qmax, rule, grad_scale = inputs
    ctx.save_for_backward(x, output[1])
    ctx.constants = (qmin, qmax, rule, grad_scale)
    ctx.src_meta = (src.dtype, src.shape)


def _grid_op_backward(ctx, grad: Tensor, _aff_grad: Tensor):
    x, aff = ctx.saved_tensors
    rule = ctx.constants[2]
    grad_x, grad_src = torch.ops.qrun.grid_quantize_backward(grad, x, aff, *ctx.constants)
    grad_src = (grad_src.to(ctx.src_meta[0]).reshape(ctx.src_meta[1])
                if rule != GRID_PLAIN and ctx.needs_input_grad[1] else None)
    return grad_x, grad_src, None, None, None, None, None, None


_grid_op.register_autograd(_grid_op_backward, setup_context=_grid_setup)


@torch.library.custom_op("qrun::dsq_quantize", mutates_args=())
def _dsq_op(x: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    y, _, aff = _levels_forward(x, lower, upper, 1.0, -math.inf, 0, levels, None, dsq=True)
    return y, aff


@_dsq_op.register_fake
def _(x, lower, upper, alpha, levels):
    return torch.empty_like(x), x.new_empty(AFFINE, dtype=torch.float32)


@torch.library.custom_op("qrun::dsq_quantize_backward", mutates_args=())
def _dsq_backward_op(grad: Tensor, x: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor,
                     levels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_x, *grads = _dsq_backward(grad, x, lower, upper, alpha, levels, False)
    return grad_x, *(g.clone() if g._base is not None else g for g in grads)


@_dsq_backward_op.register_fake
def _(grad, x, lower, upper, alpha, levels):
    scalar = grad.new_empty((), dtype=torch.float32)
    return torch.empty_like(grad), scalar, scalar.clone(), scalar.clone()


def _dsq_setup(ctx, inputs, output) -> None:
    x, lower, upper, alpha, levels = inputs
    ctx.save_for_backward(x, lower, upper, alpha)
    ctx.levels = levels


def _dsq_op_backward(ctx, grad: Tensor, _aff_grad: Tensor):
    x, lower, upper, alpha = ctx.saved_tensors
    grad_x, *grads = torch.ops.qrun.dsq_quantize_backward(grad, x, lower, upper, alpha, ctx.levels)
    grad_l, grad_u, grad_a = (g.to(p.dtype).reshape(p.shape) for g, p in zip(grads, (lower, upper, alpha)))
    return grad_x, grad_l, grad_u, grad_a, None


_dsq_op.register_autograd(_dsq_op_backward, setup_context=_dsq_setup)


@torch.library.custom_op("qrun::dorefa_weight", mutates_args=())
def _dorefa_op(w: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    y, peak, t = _dorefa_forward(w, levels)
    return y, peak, t


@_dorefa_op.register_fake
def _(w, levels):
    # The Triton kernels keep the peak in float32; the eager reference in the weight's dtype.
    peak_dtype = torch.float32 if kernels.triton_usable(w) else w.dtype
    return torch.empty_like(w), w.new_empty((), dtype=peak_dtype), torch.empty_like(w)


@torch.library.custom_op("qrun::dorefa_weight_backward", mutates_args=())
def _dorefa_backward_op(grad: Tensor, t: Tensor, peak: Tensor) -> Tensor:
    return _dorefa_backward(grad, t, peak)


@_dorefa_backward_op.register_fake
def _(grad, t, peak):
    return torch.empty_like(grad)


def _dorefa_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[2], output[1])


def _dorefa_op_backward(ctx, grad: Tensor, _peak_grad: Tensor, _t_grad: Tensor):
    t, peak = ctx.saved_tensors
    return torch.ops.qrun.dorefa_weight_backward(grad, t, peak), None


_dorefa_op.register_autograd(_dorefa_op_backward, setup_context=_dorefa_setup)


# ------------------------------------------------------------------------------------------- entry points
def grid_quantize(x: Tensor, src: Tensor, divisor: float, qmin: int, qmax: int, rule: int = GRID_PLAIN,
                  grad_scale: float = 1.0, min_src: float = -math.inf, compact: bool = False,
                  grad_in_place: bool = False) -> Tensor:
    """step * clamp(round(x / step), qmin, qmax), step = max(src, min_src) / divisor read on the device; the
    backward `rule` adds LSQ's step gradient or PACT's alpha gradient to the clipped straight-through one."""
    if _compiling():
        return torch.ops.qrun.grid_quantize(x, src, float(divisor), float(min_src), qmin, qmax, rule,
                                            float(grad_scale))[0]
    compact = compact and int8_shift(qmin, qmax) is not None
    return with_codes(*_GridFunction.apply(x, src, float(divisor), float(min_src), qmin, qmax, rule,
                                           float(grad_scale), compact, grad_in_place))


def dsq_quantize(x: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor, levels: int, compact: bool = False,
                 grad_in_place: bool = False) -> Tensor:
    """DSQ's hard forward and its backward through phi, with l, u, alpha read on the device."""
    if _compiling():
        return torch.ops.qrun.dsq_quantize(x, lower, upper, alpha, levels)[0]
    compact = compact and int8_shift(0, levels) is not None
    return with_codes(*_DSQFunction.apply(x, lower, upper, alpha, levels, compact, grad_in_place))


def dorefa_weight(w: Tensor, levels: int) -> Tensor:
    """DoReFa's eq. 9 with the peak max|tanh w| kept on the device."""
    if _compiling():
        return torch.ops.qrun.dorefa_weight(w, levels)[0]
    return _DoReFaWeightFunction.apply(w, levels)


# ----------------------------------------------------------- xnor, twn, affine: Triton passes (eager mode only)
# Their eager maths (xnor.py, twn.py, affine.py) is sync-free already and is what torch.compile traces and what
# CUDA runs where Triton cannot; these Functions replace its chains of small kernels with one or a few launches.
def _like(grad: Tensor, x: Tensor) -> Tensor:
    """grad in x's memory layout (the kernels walk both in memory order); a copy only if they differ."""
    return grad if kernels.triton_usable(x, grad) else torch.empty_like(x).copy_(grad)


class _SignFunction(Function):
    @staticmethod
    def forward(ctx, x: Tensor, compact: bool, grad_in_place: bool):
        y, codes, aff = _triton().sign_forward(x, compact)
        ctx.save_for_backward(x)
        ctx.grad_in_place = grad_in_place
        return y, (None if codes is None else Codes(codes, 1.0, 0.0, y.dtype, 0, affine=aff))

    @staticmethod
    def backward(ctx, grad: Tensor, _codes_grad: object):
        (x,) = ctx.saved_tensors
        like = _like(grad, x)
        return _triton().sign_backward(like, x, ctx.grad_in_place or like is not grad), None, None


class _XNORWeightFunction(Function):
    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        y, alpha = _triton().xnor_weight_forward(w)
        ctx.save_for_backward(w, alpha)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, alpha = ctx.saved_tensors
        return _triton().xnor_weight_backward(_like(grad, w), w, alpha)


class _TernaryFunction(Function):
    @staticmethod
    def forward(ctx, w: Tensor, threshold_factor: float) -> Tensor:
        return _triton().ternary_forward(w, threshold_factor)[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None  # TWN section 3.3: the update goes straight to the float weights


class _AffineFunction(Function):
    @staticmethod
    def forward(ctx, x: Tensor, qp: Tensor, qmin: int, qmax: int, per_channel: bool, grad_in_place: bool):
        ctx.save_for_backward(x, qp)
        ctx.constants = (qmin, qmax, per_channel)
        ctx.grad_in_place = grad_in_place
        return _triton().affine_forward(x, qp, qmin, qmax, per_channel)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, qp = ctx.saved_tensors
        like = _like(grad, x)
        grad_x = _triton().affine_backward(like, x, qp, *ctx.constants, ctx.grad_in_place or like is not grad)
        return grad_x, None, None, None, None, None


def sign(x: Tensor, compact: bool = False, grad_in_place: bool = False) -> Tensor:
    """XNOR-Net's binarized input: sign(x) (sign(0) = +1), the saturated straight-through gradient."""
    return with_codes(*_SignFunction.apply(x, compact, grad_in_place))


def xnor_weight(w: Tensor) -> Tensor:
    """XNOR-Net's eq. 4 weights with eq. 7's gradient, alpha = mean|W| per output channel kept on the device."""
    return _XNORWeightFunction.apply(w)


def ternary_weight(w: Tensor, threshold_factor: float) -> Tensor:
    """TWN's alpha {-1, 0, +1} (eq. 5-6) with Delta and alpha reduced on the device."""
    return _TernaryFunction.apply(w, float(threshold_factor))


def affine_quantize(x: Tensor, min_val: Tensor, max_val: Tensor, observe: bool, average: bool,
                    averaging_constant: float, qmin: int, qmax: int, eps: float, symmetric: bool,
                    per_channel: bool, grad_in_place: bool = False) -> Tensor:
    """Affine fake quantization with its observer on the device: when `observe`, the range buffers are updated in
    place from x (averaged into the stored range when `average`); then S (q - Z) with the cache-mask gradient."""
    with torch.no_grad():
        if observe:
            qp = _triton().affine_observe(x.detach(), min_val, max_val, average, averaging_constant, qmin, qmax, eps,
                                          symmetric, per_channel)
        else:
            qp = _triton().affine_qparams(min_val, max_val, qmin, qmax, eps, symmetric)
    return _AffineFunction.apply(x, qp, qmin, qmax, per_channel, grad_in_place)
