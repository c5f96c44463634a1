"""Learned Step Size Quantization (Esser et al., ICLR 2020).

v_hat = round(clip(v / s, -Q_N, Q_P)) * s                                             (eq. 1-2)
dv_hat/ds = -v/s + round(v/s) inside, -Q_N below, Q_P above, times g = 1/sqrt(N Q_P)   (eq. 3, section 2.2)
dv_hat/dv = 1 inside, 0 outside (straight-through estimator)
Weights: Q_N = 2^(b-1), Q_P = 2^(b-1) - 1 (b >= 2); unsigned activations: Q_N = 0, Q_P = 2^b - 1.
N is the number of weights of the layer, or the number of features of one sample for activations.
Step init 2 <|v|> / sqrt(Q_P) (section 2.1): weights from the weight tensor, activations from calibration data.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd import Function

from qrun.quant.base import IntegerGrid, Quantizer, register_quantizer
from qrun.quant.kernels import device, device_path
from qrun.quant.ste import (
    CODES_ATTR, GRID_LSQ, above, below, dot, grid_backward, grid_codes, grid_levels, pass_inside, scalar, with_codes,
)
from qrun.quant.uniform import RangeObserver, require_signed_bits

MIN_STEP = 1e-8  # the step is kept > 0 by projection after each update


class _LSQFunction(Function):
    """Saves x only (kept alive by the preceding ReLU anyway): backward recomputes the levels from it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, grad_scale: float, compact: bool,
                grad_in_place: bool):
        s = scalar(step)
        y = grid_codes(x, s, -qn, qp, compact)
        ctx.save_for_backward(x)
        ctx.constants = (s, qn, qp, grad_scale, grad_in_place)
        return y, getattr(y, CODES_ATTR, None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _codes_grad: object):
        (x,) = ctx.saved_tensors
        s, qn, qp, grad_scale, in_place = ctx.constants
        lo, hi = below(-qn * s, x.dtype), above(qp * s, x.dtype)
        # sum g (clip(round(v/s)) - v/s [inside]) = <g, q> - <g_inside, x> / s: two sums, no mask.
        fused = grid_backward(grad, x, lo, hi, in_place, GRID_LSQ, 1.0 / s, -qn, qp)
        if fused is not None:
            grad_x, g_dot_q, gx_dot_x = fused
            return grad_x, grad.new_tensor((g_dot_q - gx_dot_x / s) * grad_scale), None, None, None, None, None
        grad_x = pass_inside(grad, x, -qn * s, qp * s)
        grad_step = (dot(grad, grid_levels(x, s, -qn, qp)) - dot(grad_x, x) / s) * grad_scale
        return grad_x, grad_step.reshape(()), None, None, None, None, None


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, grad_scale: float,
                 compact: bool = False, grad_in_place: bool = False) -> torch.Tensor:
    return with_codes(*_LSQFunction.apply(x, step, qn, qp, grad_scale, compact, grad_in_place))


@register_quantizer
class LSQQuantizer(Quantizer):
    name = "lsq"
    takes_low_precision = True  # the Triton passes read bf16/fp16 and compute in float32
    host_flags = ("signed",)

    def __init__(self, bits: int, kind: str) -> None:
        super().__init__(bits, kind)
        if kind == "weight":
            require_signed_bits(self.name, bits, "weights")
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("signed", torch.tensor(kind == "weight"))
        self._observer = RangeObserver()

    def bounds(self) -> tuple[int, int]:
        """(Q_N, Q_P) of section 2."""
        if self.host_flag("signed"):
            return 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def observe(self, x: torch.Tensor) -> None:
        self._observer.update(x)

    def finish_calibration(self) -> None:
        if not self._observer:
            return
        if self.kind == "act" and self._observer.min() < 0:
            require_signed_bits(self.name, self.bits, "activations with negative values")
            self.set_flag("signed", True)
        _, qp = self.bounds()
        with torch.no_grad():
            self.step.fill_(max(2.0 * self._observer.abs_mean() / math.sqrt(qp), MIN_STEP))
        self._observer = RangeObserver()
        super().finish_calibration()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        self.ensure_initialized(x)
        if self.training:
            with torch.no_grad():
                self.step.clamp_(min=MIN_STEP)
        qn, qp = self.bounds()
        features = x.numel() if self.kind == "weight" else x[0].numel()
        compact = self.kind == "act" and torch.is_grad_enabled()
        if device_path(x):  # the step stays on the device: eq. 1-3 in one kernel per direction
            return device.grid_quantize(x, self.step, 1.0, -qn, qp, device.GRID_LSQ, 1.0 / math.sqrt(features * qp),
                                        compact=compact, grad_in_place=self.grad_in_place)
        return lsq_quantize(x, self.step, qn, qp, 1.0 / math.sqrt(features * qp), compact, self.grad_in_place)

    def learned_values(self) -> dict[str, float]:
        return {"step": scalar(self.step)}

    def integer_grid(self, y: torch.Tensor) -> IntegerGrid:
        # Levels -Q_N..Q_P; an activation grid may be signed or unsigned, 2^b - 1 bounds both.
        max_level = 2 ** (self.bits - 1) if self.kind == "weight" else 2**self.bits - 1
        return IntegerGrid(self.step.detach(), None, max_level)
