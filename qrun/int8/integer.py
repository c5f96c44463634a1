"""Integer-only reference inference (Jacob et al., CVPR 2018, section 2).

Each quantized layer computes with integer codes only: uint8/int8 inputs and weights, an int32 accumulator
    acc = sum (q_x - Z_x) q_w + q_bias,   q_bias = round(b / (S_x S_w)) in int32                     (eq. 7, 10-11)
and requantization to the next layer's input grid with a fixed-point multiplier
    q_out = Z_out + M acc,   M = S_x S_w / S_out = M0 2^-n,  M0 in [0.5, 1) held as a Q31 int32          (eq. 5-6)
computed as one int64 product acc x M0 and one rounding right shift (TFLite's kernels round twice, see
`tflite_requantize`; once is exact and matches fake quantization at 4 bits). ReLU is a clamp at Z_out, max
pooling works on codes directly (requantization is monotonic), average pooling rounds the mean of codes. The last layer returns S_x S_w acc as float logits.

The arithmetic is exact: convolutions of integer codes run in float64, whose 53-bit mantissa holds every int32
sum exactly, and everything after them is int64 tensor arithmetic. Supported networks are chains of quantized
conv/linear layers separated by ReLU, pooling and flatten (cnn, cnn_bn); others raise QrunError.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from qrun.errors import QrunError
from qrun.int8.fold import FoldedConvBN
from qrun.int8.grids import Grid, effective_weight_bias, grid_of, quantized_conv, require_storage
from qrun.quant.layers import QuantizedLayer

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# ------------------------------------------------------------------------------------ fixed-point arithmetic
def quantize_multiplier(multiplier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M = M0 2^shift with M0 in [0.5, 1) as round(M0 2^31) (TFLite's QuantizeMultiplier); returns int64 tensors."""
    m = multiplier.double()
    if bool((m <= 0).any()):
        raise QrunError("requantization multipliers must be positive")
    mantissa, exponent = torch.frexp(m)  # m = mantissa 2^exponent, mantissa in [0.5, 1)
    fixed = torch.round(mantissa * 2**31).to(torch.int64)
    overflow = fixed == 2**31  # mantissa rounded up to 1.0: renormalise
    fixed = torch.where(overflow, fixed // 2, fixed)
    shift = exponent.to(torch.int64) + overflow.to(torch.int64)
    return fixed, shift


def rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gemmlowp SaturatingRoundingDoublingHighMul: round(a b / 2^31) on int32 values held in int64."""
    product = a * b
    nudge = torch.where(product >= 0, torch.full_like(product, 1 << 30), torch.full_like(product, 1 - (1 << 30)))
    result = torch.div(product + nudge, 2**31, rounding_mode="trunc")
    saturate = (a == INT32_MIN) & (b == INT32_MIN)
    return torch.where(saturate, torch.full_like(result, INT32_MAX), result)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """gemmlowp RoundingDivideByPOT: x / 2^exponent rounded to nearest, ties away from zero."""
    mask = (torch.ones_like(exponent) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(x.dtype)
    return (x >> exponent) + (remainder > threshold).to(x.dtype)


def multiply_by_quantized_multiplier(acc: torch.Tensor, fixed: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """round(acc M) for M = fixed 2^(shift - 31), in integers only, rounded once (ties away from zero).

    TFLite's MultiplyByQuantizedMultiplier rounds twice (high multiply, then shift: `tflite_requantize`), which
    can land one step off the exact product; at 4 bits that step is 1/15 of the range and moved top-1 by
    0.2-0.4 point. The int32 x Q31 product fits int64, so one rounding shift of 31 - shift bits is exact.
    """
    right = 31 - shift
    if bool((right < 1).any()):
        raise QrunError("requantization multiplier >= 2^30 is not supported")
    return rounding_divide_by_pot(acc * fixed, right)


def tflite_requantize(acc: torch.Tensor, fixed: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """TFLite/gemmlowp's two-rounding form of the same product (kept to compare against its reference kernels)."""
    left = torch.clamp(shift, min=0)
    right = torch.clamp(-shift, min=0)
    return rounding_divide_by_pot(rounding_doubling_high_mul(acc << left, fixed), right)


def _channel_view(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (dims - 2))) if t.dim() == 1 else t


# ----------------------------------------------------------------------------------------------- the steps
class QuantizeInput(nn.Module):
    """Float network input -> codes of the first layer's input grid."""

    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid.quantize(x.float())


class IntegerLayer(nn.Module):
    """A conv or linear layer on integer codes: int32 accumulation, then fixed-point requantization."""

    def __init__(self, name: str, layer: nn.Module, input_grid: Grid, output_grid: Optional[Grid]) -> None:
        super().__init__()
        inner = quantized_conv(layer)
        if inner.weight_quantizer is None:
            raise QrunError(f"layer {name} has no weight quantizer; integer conversion needs every layer quantized")
        weight, bias = effective_weight_bias(layer)
        weight_grid = grid_of(inner.weight_quantizer, weight)
        require_storage(weight_grid, f"layer {name} weights")
        require_storage(input_grid, f"layer {name} inputs")
        if bool((weight_grid.zero_point != 0).any()):
            raise QrunError(f"layer {name} has weight zero points != 0; integer conversion expects symmetric weights")
        self.name = name
        self.conv = isinstance(inner, nn.Conv2d)
        self.conv_args = (inner.stride, inner.padding, inner.dilation, inner.groups) if self.conv else ()
        self.register_buffer("weight_codes", weight_grid.quantize(weight))  # int8 values, kept as int64
        self.input_grid, self.output_grid = input_grid, output_grid
        # S_x S_w, per output channel when the weights are per channel.
        self.register_buffer("acc_scale", (input_grid.scale.double() * weight_grid.scale.double()).reshape(-1))
        bias = torch.zeros(weight.size(0)) if bias is None else bias
        self.register_buffer("bias_codes", torch.round(bias.double() / self.acc_scale).to(torch.int64))
        if bool((self.bias_codes.abs() > INT32_MAX).any()):
            raise QrunError(f"layer {name}: a bias does not fit int32 at scale S_x S_w")
        if output_grid is not None:
            fixed, shift = quantize_multiplier(self.acc_scale / output_grid.scale.double())
            self.register_buffer("multiplier", fixed)
            self.register_buffer("shift", shift)

    def accumulate(self, codes: torch.Tensor) -> torch.Tensor:
        """int32 accumulator of sum (q_x - Z_x) q_w + q_bias (eq. 7), exact."""
        centred = (codes - self.input_grid.zero_point).to(torch.float64)
        weights = self.weight_codes.to(torch.float64)
        if self.conv:
            acc = F.conv2d(centred, weights, None, *self.conv_args)
        else:
            acc = F.linear(centred, weights)
        acc = acc.round().to(torch.int64) + _channel_view(self.bias_codes, acc.dim())
        if bool(((acc < INT32_MIN) | (acc > INT32_MAX)).any()):
            raise QrunError(f"layer {self.name}: the accumulator overflows int32")
        return acc

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        acc = self.accumulate(codes)
        if self.output_grid is None:
            return acc.to(torch.float64).mul_(_channel_view(self.acc_scale, acc.dim())).float()
        fixed = _channel_view(self.multiplier, acc.dim())
        shift = _channel_view(self.shift, acc.dim())
        out = multiply_by_quantized_multiplier(acc, fixed, shift) + self.output_grid.zero_point
        return out.clamp_(self.output_grid.qmin, self.output_grid.qmax)


class IntegerReLU(nn.Module):
    def __init__(self, zero_point: int) -> None:
        super().__init__()
        self.zero_point = zero_point

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.clamp(codes, min=self.zero_point)  # real 0 is the code Z


class IntegerPool(nn.Module):
    """Max or average pooling on codes: max commutes with the monotonic grid; the average is rounded."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(codes.to(torch.float64))
        return torch.round(pooled).to(torch.int64)


class IntegerFlatten(nn.Module):
    def __init__(self, start_dim: int = 1) -> None:
        super().__init__()
        self.start_dim = start_dim

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.flatten(self.start_dim)


class IntegerModel(nn.Module):
    """The converted chain: float images in, float logits out, integer codes in between."""

    def __init__(self, steps: list[nn.Module]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trace(x)[0]

    @torch.no_grad()
    def trace(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and, for every integer layer, its input codes dequantized (to compare with fake quantization)."""
        inputs: dict[str, torch.Tensor] = {}
        for step in self.steps:
            if isinstance(step, IntegerLayer):
                inputs[step.name] = step.input_grid.dequantize(x)
            x = step(x)
        return x, inputs


# ------------------------------------------------------------------------------------------------- conversion
class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantizedLayer, FoldedConvBN)) or super().is_leaf_module(m, qualname)


def _chain(model: nn.Module) -> list[tuple[str, object]]:
    """(name, module or op) in execution order; refuses graphs that are not a single chain."""
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    chain: list[tuple[str, object]] = []
    previous = None
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            if node.op == "output" and node.args[0] is not previous:
                raise QrunError("integer conversion supports chains only; the output is not the last op")
            previous = node if node.op == "placeholder" else previous
            continue
        inputs = [a for a in node.all_input_nodes]
        if inputs != [previous]:
            raise QrunError(f"integer conversion supports chains of layers only; {node.name} breaks the chain "
                            "(residual connections are not supported)")
        if node.op == "call_module":
            chain.append((str(node.target), modules[str(node.target)]))
        elif (node.op == "call_method" and node.target == "flatten") or node.target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            chain.append((node.name, nn.Flatten(start_dim=start)))
        elif node.target in (F.relu, torch.relu):
            chain.append((node.name, nn.ReLU()))
        else:
            raise QrunError(f"integer conversion does not support op {node.target!r}")
        previous = node
    return chain


PASS_THROUGH = (nn.Identity, nn.Dropout)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def to_integer(model: nn.Module) -> IntegerModel:
    """Convert a calibrated or trained fake-quant model (eval-mode semantics) to the integer-only reference."""
    chain = [(n, m) for n, m in _chain(model) if not isinstance(m, PASS_THROUGH)]
    layers = [i for i, (_, m) in enumerate(chain) if isinstance(m, (QuantizedLayer, FoldedConvBN))]
    for name, module in chain:
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) and not isinstance(module, QuantizedLayer):
            raise QrunError(f"layer {name} ({type(module).__name__}) is not quantized/folded; integer conversion "
                            "needs quant.first_last=quantize and folded BatchNorm")
    if not layers or layers[0] != 0:
        raise QrunError("integer conversion needs the network to start with a quantized conv or linear layer")
    grids = [_input_grid(chain[i][0], chain[i][1]) for i in layers]
    steps: list[nn.Module] = [QuantizeInput(grids[0])]
    for position, index in enumerate(layers):
        name, layer = chain[index]
        last = position + 1 == len(layers)
        output_grid = None if last else grids[position + 1]
        steps.append(IntegerLayer(name, layer, grids[position], output_grid))
        end = len(chain) if last else layers[position + 1]
        for between_name, op in chain[index + 1:end]:
            steps.append(_between_step(between_name, op, output_grid))
    return IntegerModel(steps).eval()


def _input_grid(name: str, layer: nn.Module) -> Grid:
    quantizer = quantized_conv(layer).input_quantizer
    if quantizer is None:
        raise QrunError(f"layer {name} has no input quantizer; integer conversion needs quantize_input=true")
    return grid_of(quantizer)


def _between_step(name: str, op: object, grid: Optional[Grid]) -> nn.Module:
    if grid is None:
        raise QrunError(f"op {name} follows the last quantized layer; integer conversion ends at the logits")
    if isinstance(op, nn.ReLU):
        if grid.zero_point.dim() != 0:
            raise QrunError(f"op {name}: ReLU needs a per-tensor activation grid")
        return IntegerReLU(int(grid.zero_point))
    if isinstance(op, POOLS):
        return IntegerPool(op)
    if isinstance(op, nn.Flatten):
        return IntegerFlatten(op.start_dim)
    raise QrunError(f"integer conversion does not support {type(op).__name__} ({name}); "
                    "accepted between layers: ReLU, pooling, flatten")


# ------------------------------------------------------------------------------------------------- agreement
@torch.no_grad()
def layerwise_agreement(model: nn.Module, integer_model: IntegerModel, x: torch.Tensor) -> dict[str, float]:
    """Per integer layer, the largest |integer - fake-quant| output in units of the output's quantization step.

    Each integer layer (with the integer ops up to the next layer) gets exactly the codes the fake-quant model
    fed the corresponding layer, so every layer is judged on its own arithmetic rather than on differences
    carried in from earlier layers. The output step is the next layer's input scale, or for the last layer the
    accumulator step S_x S_w of its float logits.
    """
    captured = _fake_quant_inputs(model, integer_model, x)
    layer_positions = [i for i, s in enumerate(integer_model.steps) if isinstance(s, IntegerLayer)]
    result = {}
    for k, start in enumerate(layer_positions):
        layer = integer_model.steps[start]
        codes = layer.input_grid.quantize(captured[layer.name])
        end = layer_positions[k + 1] if k + 1 < len(layer_positions) else len(integer_model.steps)
        for step in integer_model.steps[start:end]:
            codes = step(codes)
        if k + 1 < len(layer_positions):
            following = integer_model.steps[end]
            expected = captured[following.name]
            got = following.input_grid.dequantize(codes).reshape(expected.shape)
            result[layer.name] = float((got - expected).abs().max()) / float(following.input_grid.scale.max())
        else:
            expected = captured["logits"]
            result[layer.name] = float((codes - expected).abs().max()) / float(layer.acc_scale.max())
    return result


def _fake_quant_inputs(model: nn.Module, integer_model: IntegerModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of each layer's input quantizer (on its grid) and the logits of the fake-quant model in eval mode."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for step in integer_model.steps:
        if isinstance(step, IntegerLayer):
            quantizer = quantized_conv(model.get_submodule(step.name)).input_quantizer
            handles.append(quantizer.register_forward_hook(
                lambda _m, _i, out, key=step.name: captured.__setitem__(key, out.detach().float().contiguous())))
    try:
        model.eval()
        captured["logits"] = model(x).detach().float()
    finally:
        for handle in handles:
            handle.remove()
    return captured
