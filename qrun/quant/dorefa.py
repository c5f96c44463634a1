"""DoReFa-Net (Zhou et al. 2016): k-bit weights, activations and (optionally) gradients.

quantize_k(r) = round((2^k - 1) r) / (2^k - 1), straight-through                              (eq. 4)
weights, k = 1:  sign(w) * E|w|, straight-through                                         (eq. 6-7)
weights, k > 1:  2 quantize_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1                          (eq. 9)
activations:     quantize_k(clip(a, 0, 1)), so post-ReLU inputs reach all 2^k levels          (eq. 10)
gradients:       2 max0|dr| [quantize_k(dr / (2 max0|dr|) + 1/2 + N(k)) - 1/2],
                 N(k) ~ U(-1/2, 1/2) / (2^k - 1), max0 over all axes but the batch            (eq. 12)
The gradient quantizer sits on each quantized layer's output (before BatchNorm), as in the authors' code.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.autograd import Function

from qrun.errors import QrunError
from qrun.quant import kernels
from qrun.quant.base import IntegerGrid, Quantizer, register_quantizer
from qrun.quant.ste import grid_fake_quant, round_ste, sign

FULL_PRECISION_GRADIENT = 32


def quantize_k(r: torch.Tensor, bits: int) -> torch.Tensor:
    """Eq. 4 with a straight-through round; r is expected in [0, 1]."""
    n = 2**bits - 1
    return round_ste(r * n) / n


def dorefa_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 1:
        # Eq. 7: the scale E|w| is a constant for the gradient, which goes straight through sign.
        # (w - w.detach()) is exactly 0 forward, so the output is exactly +-E|w|, and carries the gradient of w.
        return (sign(w) * w.detach().abs().mean()).detach() + (w - w.detach())
    if kernels.device_path(w):
        from qrun.quant.kernels import device

        return device.dorefa_weight(w, 2**bits - 1)
    return _DoReFaWeight.apply(w, bits)


class _DoReFaWeight(Function):
    """Eq. 9 as one autograd node instead of a graph of ~10 small-tensor ops, each with its own backward node;
    on dense float32 CPU weights, one kernels.c call per direction after torch.tanh.
    The gradient is the composition's, max path included:
    with t = tanh(w), M = max|t| and g the output gradient (straight through the rounding),
    dL/dw = (1 - t^2) (g / M - [|t| = M] sgn(t) <g, t> / (M^2 #{|t| = M}))."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int) -> torch.Tensor:
        n = 2**bits - 1
        t = torch.tanh(w)
        ctx.save_for_backward(t)
        lib = kernels.usable(t)
        if lib is not None:
            y, peak = torch.empty_like(t), kernels.Sums(1)
            lib.qrun_dorefa_weight_forward(t.data_ptr(), y.data_ptr(), t.numel(), n, peak.address,
                                           kernels.threads(t.numel()))
            ctx.peak = peak[0]
            return y
        y, ctx.peak = dorefa_weight_reference(t, n)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (t,) = ctx.saved_tensors
        peak = ctx.peak
        # A float peak means the forward ran the kernel; a tensor peak (eager forward) keeps the eager backward.
        lib = None if isinstance(peak, torch.Tensor) else kernels.usable(t, grad)
        if lib is not None:
            grad_w = torch.empty_like(t)
            lib.qrun_dorefa_weight_backward(grad.data_ptr(), t.data_ptr(), grad_w.data_ptr(), t.numel(), peak,
                                            kernels.threads(t.numel()))
            return grad_w, None
        return dorefa_weight_reference_backward(grad, t, peak), None


def dorefa_weight_grid(y: torch.Tensor, bits: int) -> IntegerGrid:
    """k = 1: +-E|w|; k > 1: 2 q / n - 1 = (2 q - n) / n, the odd integers -n..n over n."""
    if bits == 1:
        return IntegerGrid(y.detach().abs().amax(), None, 1)
    n = 2**bits - 1
    return IntegerGrid(torch.full((), 1.0 / n, device=y.device), None, n)


def dorefa_weight_reference(t: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eq. 9 from t = tanh(w), peak = max|t| as a 0-d tensor): the eager path, and the device path's reference."""
    peak = t.abs().max()
    # Same operations, in the same order, as 2 quantize_k(t / (2 max|t|) + 1/2) - 1; divided by a tensor, as CUDA
    # divides by a Python number as a * (1/b) (see ste.grid_reference_forward).
    n = torch.full((), levels, dtype=torch.float32, device=t.device)  # exact up to 16 bits, unlike bf16
    return (t / (2.0 * peak)).add_(0.5).mul_(levels).round_().div_(n).mul_(2.0).sub_(1.0), peak


def dorefa_weight_reference_backward(grad: torch.Tensor, t: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """dL/dw of eq. 9, the max path included (see _DoReFaWeight)."""
    at_peak = t.abs() == peak
    through_peak = torch.sum(grad * t) / (peak * peak * at_peak.sum())
    grad_t = (grad / peak).sub_(torch.where(at_peak, t.sign() * through_peak, 0.0))
    return grad_t.mul_(1.0 - t * t)


def dorefa_activation(a: torch.Tensor, bits: int, compact: bool = False, grad_in_place: bool = False,
                      unit: Optional[torch.Tensor] = None) -> torch.Tensor:
    """clip to [0, 1] then k bits; gradient 1 inside [0, 1], 0 outside. `unit`: a 0-d 1.0 on a's device (the
    device path's grid step source, kept as a buffer so a step allocates nothing)."""
    n = 2**bits - 1
    if kernels.device_path(a):
        from qrun.quant.kernels import device

        one = torch.ones((), dtype=torch.float32, device=a.device) if unit is None else unit
        return device.grid_quantize(a, one, n, 0, n, compact=compact, grad_in_place=grad_in_place)
    return grid_fake_quant(a, 1.0 / n, 0, n, compact, grad_in_place)


class _GradientQuantize(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int) -> torch.Tensor:
        ctx.bits = bits
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return quantize_gradient(grad, ctx.bits), None


def quantize_gradient(grad: torch.Tensor, bits: int) -> torch.Tensor:
    """Eq. 12 with stochastic rounding noise from torch's generator (so seeded runs repeat)."""
    n = 2**bits - 1
    dims = tuple(range(1, grad.dim()))
    scale = 2.0 * grad.abs().amax(dim=dims, keepdim=True).clamp_min(1e-30)
    noise = (torch.rand_like(grad) - 0.5) / n
    q = torch.round((grad / scale + 0.5 + noise) * n).clamp_(0, n) / n
    return scale * (q - 0.5)


class GradientQuantizer(nn.Module):
    """Identity forward; quantizes the gradient flowing back through it to `bits` bits."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GradientQuantize.apply(x, self.bits) if torch.is_grad_enabled() else x

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


@register_quantizer
class DoReFaQuantizer(Quantizer):
    name = "dorefa"
    takes_low_precision = True  # the Triton passes read bf16/fp16 and compute in float32

    def __init__(self, bits: int, kind: str, g_bits: int = FULL_PRECISION_GRADIENT) -> None:
        """g_bits: gradient bit width for the layer outputs' gradients; 32 turns gradient quantization off."""
        super().__init__(bits, kind)
        if not (1 <= int(g_bits) <= 16 or int(g_bits) == FULL_PRECISION_GRADIENT):
            raise QrunError(f"quantizer 'dorefa' g_bits={g_bits} is out of range; accepted: 1..16, or 32 (off)")
        self.g_bits = int(g_bits)
        self.register_buffer("unit", torch.ones(()), persistent=False)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "weight":
            return dorefa_weight(x, self.bits)
        return dorefa_activation(x, self.bits, torch.is_grad_enabled(), self.grad_in_place, self.unit)

    def integer_grid(self, y: torch.Tensor) -> IntegerGrid:
        if self.kind == "weight":
            return dorefa_weight_grid(y, self.bits)
        n = 2**self.bits - 1
        return IntegerGrid(torch.full((), 1.0 / n, device=y.device), None, n)

    def gradient_quantizer(self) -> Optional[nn.Module]:
        if self.kind == "weight" and self.g_bits != FULL_PRECISION_GRADIENT:
            return GradientQuantizer(self.g_bits)
        return None

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", g_bits={self.g_bits}" if self.g_bits != FULL_PRECISION_GRADIENT else "")
