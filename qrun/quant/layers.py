"""Drop-in quantized layers: subclasses of Conv2d/Linear with the same signature and state-dict keys.

With no quantizers attached they compute exactly what the float layer computes, so a float checkpoint loads
into them and a quantizer can be attached, detached or swapped without touching the weights.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from qrun.quant import amp
from qrun.quant.base import Quantizer
from qrun.quant.ste import saving_codes


class QuantizedLayer:
    """Mixin holding the quantizer slots shared by QuantConv2d and QuantLinear."""

    weight_quantizer: Optional[Quantizer]
    input_quantizer: Optional[Quantizer]
    # Identity forward, quantizes the gradient of the layer output (DoReFa's g_bits); holds no state.
    grad_quantizer: Optional[nn.Module]

    def _init_quantizers(self, weight_quantizer: Optional[Quantizer], input_quantizer: Optional[Quantizer],
                         grad_quantizer: Optional[nn.Module] = None) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.grad_quantizer = grad_quantizer
        if input_quantizer is not None:
            input_quantizer.grad_in_place = True  # its output goes to this layer's conv/linear and nowhere else

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.compute_quantized(self.quantized_input(x), self.quantized_weight(), self.quantized_bias())
        return self.finish_output(out, x)

    def compute_quantized(self, xq: torch.Tensor, wq: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """`compute` on the quantizers' outputs. Under autocast the conv still sees exactly their levels."""
        dtype = amp.autocast_dtype(xq)
        if dtype is not None and (self.weight_quantizer is not None or self.input_quantizer is not None):
            return amp.exact_compute(self, xq, wq, bias, dtype)
        with saving_codes(xq):
            return self.compute(xq, wq, bias)

    def compute(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The float layer's operation on given (quantized) inputs."""
        raise NotImplementedError

    def finish_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Output-side hooks: XNOR-Net's input scaling K, then the gradient quantizer; identity when unused."""
        if self.input_quantizer is not None and self.input_quantizer.scales_output:
            out = self.input_quantizer.scale_output(out, x, self)
        if self.grad_quantizer is not None:
            out = self.grad_quantizer(out)
        return out

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def quantized_bias(self) -> Optional[torch.Tensor]:
        """The bias as deployed: as is, unless the weight quantizer stores it on an integer grid (affine)."""
        if self.bias is None or self.weight_quantizer is None:
            return self.bias
        return self.weight_quantizer.quantize_bias(self.bias, self.input_quantizer)


class QuantConv2d(QuantizedLayer, nn.Conv2d):
    def __init__(self, *args, weight_quantizer: Optional[Quantizer] = None,
                 input_quantizer: Optional[Quantizer] = None, **kwargs) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_quantizers(weight_quantizer, input_quantizer)

    def compute(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer: Optional[Quantizer] = None,
                   input_quantizer: Optional[Quantizer] = None) -> "QuantConv2d":
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                    weight_quantizer=weight_quantizer, input_quantizer=input_quantizer)
        _copy_parameters(conv, layer)
        return layer


class QuantLinear(QuantizedLayer, nn.Linear):
    def __init__(self, *args, weight_quantizer: Optional[Quantizer] = None,
                 input_quantizer: Optional[Quantizer] = None, **kwargs) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_quantizers(weight_quantizer, input_quantizer)

    def compute(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: Optional[Quantizer] = None,
                   input_quantizer: Optional[Quantizer] = None) -> "QuantLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype,
                    weight_quantizer=weight_quantizer, input_quantizer=input_quantizer)
        _copy_parameters(linear, layer)
        return layer


def _copy_parameters(source: nn.Module, target: nn.Module) -> None:
    with torch.no_grad():
        target.weight.copy_(source.weight)
        if source.bias is not None:
            target.bias.copy_(source.bias)


QUANTIZED_TYPES: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
