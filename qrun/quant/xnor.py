"""XNOR-Net (Rastegari et al. 2016): binary weights and inputs with real scaling factors.

Weights: W ~ alpha sign(W), alpha = mean|W| per output channel (eq. 4). The gradient is eq. 7,
dC/dW = dC/dW~ (1/n + alpha d sign/dW) with the saturated d sign/dW = 1_{|W| <= 1}; here the 1/n term is exact
(autograd through alpha = mean|W| gives sign(W_i)/n sum_j g_j sign(W_j)).
Inputs: sign(I) with the saturated straight-through gradient (zero for |x| > 1). With `k_scaling` the layer
output is multiplied by K = A * k (section 3.2): A = mean_c |I|, k a box filter of the kernel's size and stride.
sign(0) = +1 everywhere, so outputs take exactly two values. Bits must be 1.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from qrun.quant import kernels
from qrun.quant.base import IntegerGrid, Quantizer, register_quantizer
from qrun.quant.ste import sign_ste


def xnor_weight(w: torch.Tensor) -> torch.Tensor:
    alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    return sign_ste(w, saturate=True) * alpha


def input_scale(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """K of section 3.2 at the layer's output resolution; for a linear layer K = mean|x| per sample."""
    a = x.abs().mean(dim=1, keepdim=True)
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        box = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=x.dtype, device=x.device)
        padding = layer.padding if isinstance(layer.padding, tuple) else (0, 0)
        return F.conv2d(a, box, stride=layer.stride, padding=padding, dilation=layer.dilation)
    return a


@register_quantizer
class XNORQuantizer(Quantizer):
    name = "xnor"
    takes_low_precision = True  # the Triton passes read bf16/fp16 and compute in float32
    min_bits = max_bits = 1

    def __init__(self, bits: int, kind: str, k_scaling: bool = False) -> None:
        """k_scaling: multiply the layer output by the input scaling factor K (off by default, as the paper finds
        it matters little and costs a box filter per layer)."""
        super().__init__(bits, kind)
        self.k_scaling = bool(k_scaling)
        self._min_seen: float | None = None  # smallest calibration input (activations only)

    @property
    def scales_output(self) -> bool:  # type: ignore[override]
        return self.kind == "act" and self.k_scaling

    def observe(self, x: torch.Tensor) -> None:
        if self.kind == "act":
            low = float(x.min())
            self._min_seen = low if self._min_seen is None else min(self._min_seen, low)

    def finish_calibration(self) -> None:
        if self._min_seen is not None and self._min_seen >= 0:
            # A ReLU output: sign() turns all of it into +1 and the layer learns nothing from its input (and a
            # BatchNorm after it amplifies the gradient by 1/spread). Binary nets binarize BN outputs instead.
            warnings.warn("xnor: a binarized layer input is never negative (a ReLU output), so sign() makes it "
                          "all +1; use a model with binary blocks (model.options.block=binary for the CIFAR "
                          "ResNets)", stacklevel=2)
        self._min_seen = None
        super().finish_calibration()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.triton_eager(x):  # one launch per direction (and alpha stays on the device)
            from qrun.quant.kernels import device

            if self.kind == "weight":
                return device.xnor_weight(x)
            return device.sign(x, compact=torch.is_grad_enabled(), grad_in_place=self.grad_in_place)
        if self.kind == "weight":
            return xnor_weight(x)
        # The compact save is a saved_tensors_hook, which torch.compile cannot trace: plain saving there.
        return sign_ste(x, saturate=True, compact=torch.is_grad_enabled() and not torch.compiler.is_compiling())

    def integer_grid(self, y: torch.Tensor) -> IntegerGrid:
        if self.kind == "weight":  # +-alpha per output channel
            return IntegerGrid(y.detach().abs().amax(dim=tuple(range(1, y.dim())), keepdim=True), None, 1)
        return IntegerGrid(torch.ones((), device=y.device), None, 1)

    def scale_output(self, out: torch.Tensor, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        k = input_scale(x, layer)
        bias = getattr(layer, "bias", None)
        if bias is None:
            return out * k
        shape = (1, -1) + (1,) * (out.dim() - 2)
        return (out - bias.view(shape)) * k + bias.view(shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", k_scaling=True" if self.k_scaling and self.kind == "act" else "")
