"""PACT (Choi et al. 2018): a learned activation clipping level alpha; weights quantized with DoReFa.

y = clip(x, 0, alpha);  y_q = round(y (2^b - 1) / alpha) alpha / (2^b - 1)                 (eq. 1-2)
dy_q/dx = 1 for 0 <= x < alpha, else 0;  dy_q/dalpha = 1 for x >= alpha, else 0            (eq. 3, STE)
If calibration sees negative inputs (a first layer fed normalised pixels), the clip is symmetric, [-alpha, alpha]
on a symmetric signed grid, and x <= -alpha gives alpha a gradient of -1.
alpha starts from calibration data (mean of the batch maxima) unless `init_alpha` is given (the paper uses 10).
The paper's L2 penalty on alpha is left to the optimizer; qrun puts quantizer parameters in a group without decay.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.autograd import Function

from qrun.errors import QrunError
from qrun.quant.base import IntegerGrid, Quantizer, register_quantizer
from qrun.quant.dorefa import dorefa_weight, dorefa_weight_grid
from qrun.quant.kernels import device, device_path
from qrun.quant.ste import (
    CODES_ATTR, GRID_PACT, above, below, grid_backward, grid_codes, scalar, sum_above, with_codes,
)
from qrun.quant.uniform import (
    RangeObserver, activation_grid, require_signed_bits, signed_qmax, unsigned_qmax,
)

MIN_ALPHA = 1e-6


class _PACTFunction(Function):
    """Saves x only (kept alive by the preceding ReLU anyway)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, qmax: int, signed: bool, compact: bool,
                grad_in_place: bool):
        a = scalar(alpha)
        ctx.save_for_backward(x)
        ctx.constants = (a, signed, grad_in_place)
        y = grid_codes(x, a / qmax, -qmax if signed else 0, qmax, compact)
        return y, getattr(y, CODES_ATTR, None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _codes_grad: object):
        (x,) = ctx.saved_tensors
        a, signed, in_place = ctx.constants
        lo = -a if signed else 0.0
        # x in [lo, alpha): the upper bound is exclusive, as in eq. 3. alpha's gradient: the sum over x >= alpha,
        # minus (signed clip) the sum over x <= -alpha.
        fused = grid_backward(grad, x, below(lo, x.dtype), a, in_place, GRID_PACT,
                              above_t=below(a, x.dtype), below_t=above(-a, x.dtype) if signed else -math.inf)
        if fused is not None:
            grad_x, at_top, at_bottom = fused
            return grad_x, grad.new_tensor(at_top - at_bottom), None, None, None, None
        grad_x = torch.ops.aten.hardtanh_backward(grad, x, below(lo, x.dtype), a)
        grad_alpha = sum_above(grad, x, below(a, x.dtype))
        if signed:
            grad_alpha = grad_alpha - (grad.sum() - sum_above(grad, x, -a))
        return grad_x, grad_alpha.reshape(()), None, None, None, None


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, bits: int, signed: bool = False,
                  compact: bool = False, grad_in_place: bool = False) -> torch.Tensor:
    qmax = signed_qmax(bits) if signed else unsigned_qmax(bits)
    return with_codes(*_PACTFunction.apply(x, alpha, qmax, signed, compact, grad_in_place))


@register_quantizer
class PACTQuantizer(Quantizer):
    name = "pact"
    takes_low_precision = True  # the Triton passes read bf16/fp16 and compute in float32
    host_flags = ("signed",)

    def __init__(self, bits: int, kind: str, init_alpha: Optional[float] = None) -> None:
        """init_alpha: fixed initial clipping level (the paper's 10.0); None initialises it from data."""
        super().__init__(bits, kind)
        if init_alpha is not None and init_alpha <= 0:
            raise QrunError(f"quantizer 'pact' init_alpha={init_alpha} is invalid; accepted: a positive number or null")
        self.init_alpha = init_alpha
        if kind == "act":
            self.alpha = nn.Parameter(torch.tensor(float(init_alpha or 1.0)))
            self.register_buffer("signed", torch.zeros((), dtype=torch.bool))
        self._observer = RangeObserver()

    def observe(self, x: torch.Tensor) -> None:
        if self.kind == "act":
            self._observer.update(x)

    def finish_calibration(self) -> None:
        if self.kind == "act":
            if not self._observer:
                return
            signed = self._observer.min() < 0
            if signed:
                require_signed_bits(self.name, self.bits, "activations with negative values")
            self.set_flag("signed", signed)
            if self.init_alpha is None:
                bound = max(-self._observer.min(), self._observer.max()) if signed else self._observer.max()
                with torch.no_grad():
                    self.alpha.fill_(max(bound, MIN_ALPHA))
            self._observer = RangeObserver()
        super().finish_calibration()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "weight":
            return dorefa_weight(x, self.bits)
        self.ensure_initialized(x)
        if self.training:
            with torch.no_grad():
                self.alpha.clamp_(min=MIN_ALPHA)
        signed = self.host_flag("signed")
        if device_path(x):  # alpha stays on the device: eq. 1-3 in one kernel per direction
            qmax = signed_qmax(self.bits) if signed else unsigned_qmax(self.bits)
            return device.grid_quantize(x, self.alpha, qmax, -qmax if signed else 0, qmax, device.GRID_PACT,
                                        compact=torch.is_grad_enabled(), grad_in_place=self.grad_in_place)
        return pact_quantize(x, self.alpha, self.bits, signed, torch.is_grad_enabled(), self.grad_in_place)

    def learned_values(self) -> dict[str, float]:
        return {"alpha": scalar(self.alpha)} if self.kind == "act" else {}

    def integer_grid(self, y: torch.Tensor) -> IntegerGrid:
        if self.kind == "weight":
            return dorefa_weight_grid(y, self.bits)
        return activation_grid(self.alpha, self.bits, self.host_flag("signed"))
