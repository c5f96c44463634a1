"""The integer grid behind a fake quantizer: r = scale (q - zero_point), q in [qmin, qmax] (Jacob et al. eq. 1).

Integer conversion and ONNX export need the grid each quantizer simulates. It is read from the quantizers'
public attributes: `affine` (scale, zero point, per-channel axis), `uniform` (symmetric weights from max|W|,
an activation range `range` with a `signed` flag) and `lsq` (a step and its (Q_N, Q_P) bounds). A grid is
representable in ONNX/int8 when its codes fit int8 or uint8; other quantizers (dsq, pact, dorefa, ...) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from qrun.errors import QrunError
from qrun.quant.base import Quantizer

EXPORTABLE = ("affine", "uniform", "lsq")
STORAGE = {"uint8": (0, 255), "int8": (-128, 127)}


@dataclass(frozen=True)
class Grid:
    scale: torch.Tensor  # 0-d, or one entry per channel along `axis`
    zero_point: torch.Tensor  # int64, same shape as scale
    qmin: int
    qmax: int
    axis: Optional[int] = None

    def _view(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.axis is None or t.dim() == 0:
            return t
        shape = [1] * like.dim()
        shape[self.axis] = -1
        return t.reshape(shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int64): clamp(round(x / scale) + zero_point), rounding half to even like the kernels."""
        inverse = self._view(1.0 / self.scale.to(x.dtype), x)
        codes = torch.round(x * inverse) + self._view(self.zero_point, x)
        return codes.clamp_(self.qmin, self.qmax).to(torch.int64)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self._view(self.zero_point, q)).to(torch.float32) * self._view(self.scale.float(), q)

    @property
    def storage(self) -> Optional[str]:
        """'uint8' or 'int8' when every code fits that type, else None (not representable in ONNX QDQ)."""
        for name, (lo, hi) in STORAGE.items():
            if lo <= self.qmin and self.qmax <= hi:
                return name
        return None


def grid_of(quantizer: Quantizer, tensor: Optional[torch.Tensor] = None) -> Grid:
    """The grid a quantizer currently simulates; `tensor` is the weight for quantizers that scale by max|W|."""
    name = quantizer.name
    if name == "affine":
        scale, zero_point = quantizer.qparams()
        axis = 0 if quantizer.per_channel else None
        return Grid(scale.detach().float(), zero_point.detach().long(), quantizer.qmin, quantizer.qmax, axis)
    if name == "uniform":
        from qrun.quant.uniform import signed_qmax, unsigned_qmax

        if quantizer.kind == "weight":
            if tensor is None:
                raise QrunError("the uniform weight grid needs the weight tensor")
            qmax = signed_qmax(quantizer.bits)
            return _zero_point_grid(max(float(tensor.detach().abs().max()), 1e-12) / qmax, -qmax, qmax)
        bound = float(quantizer.range)
        if bool(quantizer.signed):
            qmax = signed_qmax(quantizer.bits)
            return _zero_point_grid(bound / qmax, -qmax, qmax)
        qmax = unsigned_qmax(quantizer.bits)
        return _zero_point_grid(bound / qmax, 0, qmax)
    if name == "lsq":
        qn, qp = quantizer.bounds()
        return _zero_point_grid(float(quantizer.step.detach()), -qn, qp)
    raise QrunError(f"quantizer {name!r} has no integer grid to convert or export; accepted: {', '.join(EXPORTABLE)}")


def _zero_point_grid(scale: float, qmin: int, qmax: int) -> Grid:
    return Grid(torch.tensor(scale, dtype=torch.float32), torch.zeros((), dtype=torch.int64), qmin, qmax)


def effective_weight_bias(layer: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The float weight and bias the layer's quantizer sees in eval mode (folded for a FoldedConvBN)."""
    from qrun.int8.fold import FoldedConvBN

    if isinstance(layer, FoldedConvBN):
        weight, bias = layer.folded()
        return weight.detach(), bias.detach()
    return layer.weight.detach(), None if layer.bias is None else layer.bias.detach()


def quantized_conv(layer: nn.Module) -> nn.Module:
    """The QuantConv2d/QuantLinear holding the quantizers (inside a FoldedConvBN, its conv)."""
    from qrun.int8.fold import FoldedConvBN

    return layer.conv if isinstance(layer, FoldedConvBN) else layer


def require_storage(grid: Grid, what: str) -> str:
    storage = grid.storage
    if storage is None:
        raise QrunError(f"{what} uses codes {grid.qmin}..{grid.qmax}, which fit neither int8 nor uint8; "
                        "accepted: bits <= 8")
    return storage
