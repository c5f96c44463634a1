"""Quantized layers under autocast: the conv/linear sees exactly the levels the float32 quantizer gives.

Casting a fake-quantized tensor y = offset + scale * k to bf16 keeps 8 significant bits, so an 8-bit grid
loses levels (U(0, 100) kept 236 of 256 in tests/test_amp.py) and a bf16 quantizer input moves outputs one level
off. So under autocast:
1. a quantized layer's quantizers run in float32 (Quantizer.forward disables autocast and casts the input up);
2. when both describe their output as integer levels (`Quantizer.integer_grid`) within what the autocast dtype
   holds exactly (bf16: |k| <= 256, fp16: |k| <= 2048), the layer feeds its conv those integers (fp16: times a
   power of two, so the conv output stays in fp16's range) and applies scales and offsets to the conv output:
       conv(o_a + s_a k_a, o_w + s_w k_w) = s_a s_w conv(k_a, k_w) + s_a o_w conv(k_a, 1)
                                            + o_a s_w conv(M, k_w) + o_a o_w conv(M, 1)
   with M the input's support (ones, zero in the padding, where y is 0 and not o_a); an activation whose
   quantizer attached its 1-byte codes (training, bf16) gets its levels from them;
3. otherwise (a grid too fine for the dtype, or no integer form) the layer runs its conv in float32.
The gradients are the float layer's: d/dy of the rescaled integer conv is the conv's gradient with the weight y_w.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torch.autograd import Function
from torch.nn import functional as F

from qrun.quant.base import IntegerGrid
from qrun.quant.ste import CODES_ATTR, Codes, levels_of, saving_codes

if TYPE_CHECKING:
    from qrun.quant.layers import QuantizedLayer

# Largest |integer| up to which every integer is representable: 2^(significand bits).
EXACT_INTEGERS = {torch.bfloat16: 2**8, torch.float16: 2**11}
# fp16 levels are fed as k * 2^e with e in this range: exact (multiples of fp16's smallest subnormal 2^-24,
# at most 2048 * 2^4 < 65504) and, with 2^e ~ the scale, the conv output has the magnitude of the float layer's.
FP16_EXPONENTS = (-24, 4)
TINY = torch.finfo(torch.float32).tiny


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The lower-precision dtype autocast is running for x's device, or None when autocast is off there."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype in EXACT_INTEGERS else None


def exact_levels(grid: Optional[IntegerGrid], dtype: torch.dtype) -> bool:
    return grid is not None and grid.max_level <= EXACT_INTEGERS[dtype]


class _ToLevels(Function):
    """y -> (y - offset) / ratio rounded to the autocast dtype; backward: grad / ratio in float32.

    ratio is the grid's scale, over a power of two `unit` for fp16 (dividing by it gives the level times unit,
    exactly)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, ratio: torch.Tensor, offset: Optional[torch.Tensor], unit: Optional[torch.Tensor],
                dtype: torch.dtype) -> torch.Tensor:
        # 1-d, not 0-d: bf16 gradient / ratio then promotes to float32 in one pass.
        ctx.ratio = ratio.reshape(1) if ratio.dim() == 0 else ratio
        if offset is None:
            # y / s is within a few float32 ulps of the integer level; the float32 quotient, rounded once to the
            # autocast dtype on store, lands on it exactly (bf16/fp16 spacing at |k| <= 256/2048 is ~2^13 times
            # coarser), so no separate rounding pass.
            if torch.compiler.is_compiling():
                # The same values without out=: torch 2.11's dynamo gives a Function output written by an out= or
                # in-place op a zero gradient. Compiled graphs fuse the cast anyway.
                return torch.div(y, ratio).to(dtype)
            return torch.div(y, ratio, out=torch.empty_like(y, dtype=dtype))
        # y - o can lose low bits of y (|o| >> s): round() snaps the quotient to the level (before the fp16 unit).
        levels = torch.sub(y, offset).div_(ratio if unit is None else ratio * unit).round_()
        return (levels if unit is None else levels.mul_(unit)).to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.div(grad, ctx.ratio), None, None, None, None


class _CodesToLevels(Function):
    """y's levels from the 1-byte codes its quantizer attached (q = codes + shift, the level `integer_grid`
    describes): exact by construction, and one pass reading 1 byte per element instead of y's 4 (and, for a grid
    with an offset, instead of four passes: subtract, divide, round, cast). Backward: grad / ratio, as _ToLevels."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, codes: Codes, ratio: torch.Tensor) -> torch.Tensor:
        ctx.ratio = ratio.reshape(1) if ratio.dim() == 0 else ratio
        if codes.affine is not None:  # the device path's codes: its decode kernel with the unit affine [1, 0]
            from qrun.quant.kernels import device

            return device.decode(codes.codes, _unit_affine(codes.codes.device), codes.shift, torch.bfloat16)
        return levels_of(codes.codes, codes.shift, torch.bfloat16)  # |q| <= 256: exact in bf16

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.div(grad, ctx.ratio), None, None


_UNIT_AFFINE: dict[torch.device, torch.Tensor] = {}


def _unit_affine(device: torch.device) -> torch.Tensor:
    """[1, 0] (scale, offset) on `device`, made once, by fills: torch.tensor([...]) would be a host-to-device copy."""
    if device not in _UNIT_AFFINE:
        unit = torch.zeros(4, device=device)
        unit[:1].fill_(1.0)
        _UNIT_AFFINE[device] = unit
    return _UNIT_AFFINE[device]


def to_levels(y: torch.Tensor, grid: IntegerGrid, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the levels fed to the conv, the factor that turns them back into y's scale)."""
    ratio, unit = grid.scale.float().clamp_min(TINY), None
    codes = getattr(y, CODES_ATTR, None)
    if codes is not None and dtype == torch.bfloat16 and not torch.compiler.is_compiling():
        return _CodesToLevels.apply(y, codes, ratio), ratio
    if dtype == torch.float16:  # scale = m 2^e, m in [0.5, 1): feed k 2^e, keep m
        unit = torch.ldexp(torch.ones_like(ratio), torch.frexp(ratio).exponent.clamp(*FP16_EXPONENTS))
        ratio = ratio / unit
    return _ToLevels.apply(y, ratio, grid.offset, unit, dtype), ratio


def exact_compute(layer: "QuantizedLayer", xq: torch.Tensor, wq: torch.Tensor, bias: Optional[torch.Tensor],
                  dtype: torch.dtype) -> torch.Tensor:
    """The layer's conv/linear of its quantizers' float32 outputs xq, wq under autocast (module docstring)."""
    foreign = [q for q in (layer.input_quantizer, layer.weight_quantizer) if q is not None
               and not hasattr(q, "integer_grid")]
    if foreign:  # a module from another library in a quantizer slot (bench_gpu's torch.ao peers): stock autocast
        with saving_codes(xq):
            return layer.compute(xq, wq, bias)
    a_grid = layer.input_quantizer.integer_grid(xq) if layer.input_quantizer is not None else None
    w_grid = layer.weight_quantizer.integer_grid(wq) if layer.weight_quantizer is not None else None
    integer_input = layer.input_quantizer is not None and exact_levels(a_grid, dtype)
    integer_weight = layer.weight_quantizer is not None and exact_levels(w_grid, dtype)
    exact = ((layer.input_quantizer is None or integer_input) and (layer.weight_quantizer is None or integer_weight))
    offsets = (integer_input and a_grid.offset is not None) or (integer_weight and w_grid.offset is not None)
    if not exact or (offsets and not _offsets_supported(layer)):
        with torch.autocast(xq.device.type, enabled=False):
            return layer.compute(xq.float(), wq.float(), bias)
    a_in, a_ratio, a_offset = xq, None, None
    if integer_input:
        a_in, a_ratio = to_levels(xq, a_grid, dtype)
        a_offset = a_grid.offset
    w_in, w_ratio, w_offset = wq, None, None
    if integer_weight:
        w_in, w_ratio = to_levels(wq, w_grid, dtype)
        w_offset = w_grid.offset
    with saving_codes(_with_level_codes(a_in, xq, dtype)):
        out = layer.compute(a_in, w_in, None)
    out = _rescale(layer, out, a_in, w_in, a_ratio, a_offset, w_ratio, w_offset)
    return out if bias is None else out.add_(_per_channel(layer, bias, out))


def _with_level_codes(levels: torch.Tensor, xq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Attach the activation quantizer's 1-byte codes to the bf16 levels, so the conv saves those for backward.

    The codes hold the same level q (y = offset + scale q, the representation `integer_grid` uses), so the
    levels are (codes + shift) in bf16, exactly. fp16 levels carry a power-of-two unit (a device tensor): saved as is.
    """
    if torch.compiler.is_compiling():  # saved-tensor hooks break the graph; compiled graphs plan their own saves
        return levels
    codes = getattr(xq, CODES_ATTR, None)
    if codes is not None and dtype == torch.bfloat16 and levels is not xq:
        setattr(levels, CODES_ATTR, Codes(codes.codes, 1.0, 0.0, dtype, codes.shift))
    return levels


def _rescale(layer: nn.Module, out: torch.Tensor, a_in: torch.Tensor, w_in: torch.Tensor,
             a_ratio: Optional[torch.Tensor], a_offset: Optional[torch.Tensor],
             w_ratio: Optional[torch.Tensor], w_offset: Optional[torch.Tensor]) -> torch.Tensor:
    """Scales and offsets applied to conv(a_in, w_in), in place (the conv does not need its output for backward)."""
    ratios = [r for r in (a_ratio, w_ratio) if r is not None]
    if ratios:
        out = out.mul_(_per_channel(layer, ratios[0] if len(ratios) == 1 else ratios[0] * ratios[1], out))
    if w_offset is not None:
        coefficient = w_offset if a_ratio is None else a_ratio * w_offset
        out = out.addcmul_(_input_window_sums(layer, a_in, out), _per_channel(layer, coefficient, out))
    if a_offset is not None:
        coefficient = a_offset if w_ratio is None else a_offset * w_ratio
        out = out.addcmul_(_weight_window_sums(layer, a_in, w_in), _per_channel(layer, coefficient, out))
    if a_offset is not None and w_offset is not None:
        out = out.addcmul_(_window_counts(layer, a_in, out), _per_channel(layer, a_offset * w_offset, out))
    return out


def _per_channel(layer: nn.Module, value: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A 0-d or per-output-channel value shaped to broadcast over the layer output (channels: dim 1 for conv,
    the last dim for linear)."""
    if value.numel() == 1:
        return value.reshape(())
    if isinstance(layer, nn.Conv2d):
        return value.reshape(1, -1, *([1] * (out.dim() - 2)))
    return value.reshape(-1)


def _offsets_supported(layer: nn.Module) -> bool:
    """The window sums below model zero padding; other padding modes pad with real values (float32 path then)."""
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros")


def _ones_kernel(layer: nn.Conv2d, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One all-ones filter per group: conv with it sums each group's input over the receptive field."""
    return torch.ones(layer.groups, layer.in_channels // layer.groups, *layer.kernel_size, dtype=dtype, device=device)


def _conv(layer: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def _per_output(layer: nn.Conv2d, sums: torch.Tensor) -> torch.Tensor:
    """Per-group sums [N, groups, H, W] broadcast to the output channels."""
    if layer.groups == 1 or layer.groups == layer.out_channels:
        return sums
    return sums.repeat_interleave(layer.out_channels // layer.groups, dim=1)


def _input_window_sums(layer: nn.Module, a_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """conv(a, 1): sum of the input levels under each receptive field (the weight offset's contribution)."""
    if isinstance(layer, nn.Linear):
        return a_in.sum(dim=-1, keepdim=True)
    return _per_output(layer, _conv(layer, a_in, _ones_kernel(layer, out.dtype, out.device)))


def _weight_window_sums(layer: nn.Module, a_in: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
    """conv(M, w): sum of the weight levels over the input positions each output sees (the input offset's part).

    Batch-independent (one sample of ones), in float32 so the integer sums are exact.
    """
    with torch.autocast(a_in.device.type, enabled=False):
        if isinstance(layer, nn.Linear):
            return w_in.float().sum(dim=1)
        support = torch.ones(1, *a_in.shape[1:], dtype=torch.float32, device=a_in.device)
        return _conv(layer, support, w_in.float())


def _window_counts(layer: nn.Module, a_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """conv(M, 1): how many input values each output sees (fewer at the zero-padded border)."""
    with torch.autocast(a_in.device.type, enabled=False):
        if isinstance(layer, nn.Linear):
            return torch.full((1,), float(a_in.size(-1)), device=a_in.device)
        support = torch.ones(1, *a_in.shape[1:], dtype=torch.float32, device=a_in.device)
        return _per_output(layer, _conv(layer, support, _ones_kernel(layer, torch.float32, a_in.device)))
