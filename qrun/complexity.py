"""Model complexity for results.json and the sweep report: parameters, MACs, BOPs and size at the quantized widths.

MACs come from torch's own FLOP counter (`torch.utils.flop_counter.FlopCounterMode`, which counts the matrix
products and convolutions a forward pass dispatches), halved: one multiply-accumulate is two FLOPs. BOPs weight
each layer's MACs by its weight bits times its input (activation) bits, as in the BOPs measure of Baskin et al.
(UNIQ) used by quantization papers; a layer that is not quantized, or whose input is not, counts at 32 bits.

A conv folded with its BatchNorm (quant=affine, `qrun.int8.fold.FoldedConvBN`) runs its convolution from the
wrapper's forward, so the FLOP counter books those MACs under the wrapper: they are taken from there, and the
layer counts at its own bit widths. Its size is what deployment stores: the folded weights at the weight width
and one bias per output channel (int32), the BatchNorm parameters folded away.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from qrun.int8.fold import FoldedConvBN
from qrun.quant import QuantizedLayer, quantizer_parameters

FULL_PRECISION_BITS = 32


def layer_bits(module: nn.Module) -> tuple[int, int]:
    """(weight bits, input bits) a layer computes with; 32 for whatever is left in floating point."""
    if not isinstance(module, QuantizedLayer):
        return FULL_PRECISION_BITS, FULL_PRECISION_BITS
    w_bits = module.weight_quantizer.bits if module.weight_quantizer is not None else FULL_PRECISION_BITS
    a_bits = module.input_quantizer.bits if module.input_quantizer is not None else FULL_PRECISION_BITS
    return int(w_bits), int(a_bits)


def layer_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total MACs of one forward pass and the MACs of each module, by its name in `model.named_modules()`.

    The counter runs on a copy in eval mode without gradients, so BatchNorm statistics and quantizer state of
    the real model are untouched.
    """
    probe = copy.deepcopy(model).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(example)
    root = type(probe).__name__
    per_module: dict[str, int] = {}
    for name, counts in counter.get_flop_counts().items():
        if name == root or name.startswith(root + "."):
            per_module[name[len(root) + 1:]] = sum(counts.values()) // 2
    return counter.get_total_flops() // 2, per_module


def compute_layers(model: nn.Module, per_module: dict[str, int]) -> list[tuple[str, nn.Module, int]]:
    """(name, layer, MACs) of every Conv2d/Linear that ran."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    names = [name for name, _ in layers]
    found = [(name, module, _booked_macs(name, per_module, names)) for name, module in layers]
    return [entry for entry in found if entry[2]]


def _booked_macs(name: str, per_module: dict[str, int], layer_names: list[str]) -> int:
    """A layer's MACs; when they are booked under its parent (the parent called the layer's weights itself, as
    FoldedConvBN does), the parent's, provided the parent holds no other Conv2d/Linear."""
    if name in per_module:
        return per_module[name]
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # nearest ancestor first
        parent = ".".join(parts[:cut])
        if parent in per_module:
            inside = [other for other in layer_names if other.startswith(parent + ".")]
            return per_module[parent] if inside == [name] else 0
    return 0


def bit_operations(model: nn.Module, total_macs: int, per_module: dict[str, int]) -> int:
    """Sum of MACs x weight bits x input bits over Conv2d/Linear layers; other counted ops at 32 x 32."""
    bops, covered = 0, 0
    for _, module, macs in compute_layers(model, per_module):
        w_bits, a_bits = layer_bits(module)
        bops += macs * w_bits * a_bits
        covered += macs
    return bops + (total_macs - covered) * FULL_PRECISION_BITS * FULL_PRECISION_BITS


def bit_widths(model: nn.Module) -> list[str]:
    """The distinct `W<w>A<a>` pairs of the quantized layers (float layers left out): more than one means the
    run mixes widths (quant.layer_overrides, first_last=8bit), whatever its global `bits` says."""
    pairs = {layer_bits(m) for m in model.modules() if isinstance(m, QuantizedLayer)}
    return [f"W{w}A{a}" for w, a in sorted(pairs, reverse=True)]


def size_bytes(model: nn.Module) -> int:
    """Bytes to store the network: quantized weights at their bit width, everything else in float32.

    Counts the same parameters as `params` (the network's; quantizer scalars excluded), each tensor rounded up
    to whole bytes.
    """
    quantized_weights = {id(m.weight): layer_bits(m)[0] for m in model.modules()
                         if isinstance(m, QuantizedLayer) and m.weight_quantizer is not None}
    skipped = {id(p) for p in quantizer_parameters(model)}
    total = 0
    for folded in (m for m in model.modules() if isinstance(m, FoldedConvBN)):
        # BatchNorm scale and shift (and a conv bias) become the folded layer's one int32 bias per channel.
        skipped |= {id(p) for p in folded.bn.parameters()}
        skipped |= {id(folded.conv.bias)} if folded.conv.bias is not None else set()
        total += 4 * folded.conv.out_channels
    for parameter in model.parameters():
        if id(parameter) in skipped:
            continue
        bits = quantized_weights.get(id(parameter), FULL_PRECISION_BITS)
        total += math.ceil(parameter.numel() * bits / 8)
    return total


def example_input(dataset_cfg: Any, device: Optional[torch.device] = None) -> torch.Tensor:
    """One zero image of the dataset's shape: MACs of these models do not depend on the pixel values."""
    size = int(dataset_cfg.image_size)
    return torch.zeros(1, int(dataset_cfg.in_channels), size, size, device=device)


def measure(model: nn.Module, dataset_cfg: Any) -> dict[str, Any]:
    """The complexity fields of results.json: macs, bops, size_bytes (at quantized widths), size_fp32_bytes,
    and layer_bits (the distinct per-layer widths)."""
    device = next(model.parameters()).device
    total, per_module = layer_macs(model, example_input(dataset_cfg, device))
    quant_ids = {id(p) for p in quantizer_parameters(model)}
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters() if id(p) not in quant_ids)
    return {"macs": int(total), "bops": int(bit_operations(model, total, per_module)),
            "size_bytes": size_bytes(model), "size_fp32_bytes": fp32_bytes, "layer_bits": bit_widths(model)}
