"""Ternary Weight Networks (Li & Liu 2016): W ~ alpha {-1, 0, +1}, weights only.

Delta = 0.7 E|W| (eq. 6, per layer);  alpha = (1 / |I_Delta|) sum_{i in I_Delta} |W_i|,  I_Delta = {i : |W_i| > Delta}
(eq. 5): alpha is divided by the number of weights above the threshold, not by the layer size.
The ternary weights are used forward and backward but the update goes to the float weights (section 3.3),
i.e. a straight-through gradient. Bits must be 2 (three levels); activations are not ternarised.
"""

from __future__ import annotations

import torch

from qrun.quant import kernels
from qrun.quant.base import IntegerGrid, Quantizer, register_quantizer
from qrun.quant.ste import scalar

THRESHOLD_FACTOR = 0.7


def ternary_parameters(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Delta, alpha) of eq. 5-6 for one layer."""
    a = w.abs()
    delta = THRESHOLD_FACTOR * a.mean()
    above = a > delta
    alpha = (a * above).sum() / above.sum().clamp_min(1)
    return delta, alpha


def ternarize(w: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        delta, alpha = ternary_parameters(w)
        t = alpha * ((w > delta).to(w.dtype) - (w < -delta).to(w.dtype))
    return t + (w - w.detach())  # exactly t forward, identity gradient


@register_quantizer
class TWNQuantizer(Quantizer):
    name = "twn"
    supported_kinds = ("weight",)
    min_bits = max_bits = 2

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.triton_eager(x):  # Delta, alpha and the output in three launches, nothing read on the host
            from qrun.quant.kernels import device

            return device.ternary_weight(x, THRESHOLD_FACTOR)
        return ternarize(x)

    def integer_grid(self, y: torch.Tensor) -> IntegerGrid:
        return IntegerGrid(y.detach().abs().amax(), None, 1)  # alpha {-1, 0, 1}

    def alpha_of(self, w: torch.Tensor) -> float:
        """The scale this quantizer gives weight tensor `w` (for tables and tests)."""
        return scalar(ternary_parameters(w.detach())[1])
