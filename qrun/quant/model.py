"""Model-level operations on quantizers: swap layers in, find them, initialise them from data, report them."""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from qrun.errors import QrunError
from qrun.quant.base import Quantizer, build_quantizer, quantizer_class
from qrun.quant.layers import QUANTIZED_TYPES, QuantizedLayer
from qrun.quant.policy import EDGE_BITS, LayerPlan, plan_layers

FULL_PRECISION = "none"
EDGE_FALLBACK = "uniform"  # for first/last layers at 8 bits when the chosen quantizer has no 8-bit form


def quantize_model(model: nn.Module, name: str, w_bits: int, a_bits: int, quantize_input: bool,
                   first_last: str = "fp", layer_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
                   **options: Any) -> nn.Module:
    """Replace Conv2d/Linear layers in place by quantized drop-ins under the layer policy; returns the model."""
    if name == FULL_PRECISION:
        return model
    for plan in plan_layers(model, w_bits, a_bits, quantize_input, first_last, layer_overrides):
        if not plan.skip:
            layer_name, layer_options = _edge_fallback(plan, name, first_last, options)
            _swap_layer(model, plan, layer_name, layer_options)
    quantizer_class(name).prepare_model(model, **options)
    return model


def _edge_fallback(plan: LayerPlan, name: str, first_last: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Under first_last=8bit, a quantizer that cannot do 8 bits (xnor, twn) leaves its edge layers to `uniform`."""
    if first_last != "8bit" or not plan.edge:
        return name, options
    cls = quantizer_class(name)
    kinds_ok = plan.quantize_input <= ("act" in cls.supported_kinds)
    if cls.min_bits <= EDGE_BITS <= cls.max_bits and kinds_ok:
        return name, options
    accepted = inspect.signature(quantizer_class(EDGE_FALLBACK).__init__).parameters
    return EDGE_FALLBACK, {k: v for k, v in options.items() if k in accepted}


def _swap_layer(model: nn.Module, plan: LayerPlan, name: str, options: dict[str, Any]) -> None:
    parent_name, _, child_name = plan.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    float_layer = getattr(parent, child_name)
    weight_quantizer = build_quantizer(name, plan.w_bits, "weight", **options)
    input_quantizer = build_quantizer(name, plan.a_bits, "act", **options) if plan.quantize_input else None
    quantized = QUANTIZED_TYPES[type(float_layer)].from_float(float_layer, weight_quantizer, input_quantizer)
    quantized.grad_quantizer = weight_quantizer.gradient_quantizer()
    quantized.train(float_layer.training)
    setattr(parent, child_name, quantized)


def quantizers(model: nn.Module) -> Iterator[tuple[str, str, Quantizer]]:
    """(layer name, 'weight' | 'act', quantizer) for every attached quantizer, in module order."""
    for layer_name, layer in model.named_modules():
        if isinstance(layer, QuantizedLayer):
            if layer.weight_quantizer is not None:
                yield layer_name, "weight", layer.weight_quantizer
            if layer.input_quantizer is not None:
                yield layer_name, "act", layer.input_quantizer


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Learned quantizer parameters (alpha, bounds, steps...): they get their own optimizer group, no weight decay."""
    params: list[nn.Parameter] = []
    for _, _, quantizer in quantizers(model):
        params.extend(p for p in quantizer.parameters() if p.requires_grad)
    return params


@torch.no_grad()
def initialize_from_data(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set data-dependent quantizer values from a few batches; returns how many batches were used.

    The model runs in train mode (as it will during training) but BatchNorm running statistics are restored
    afterwards, so calibration leaves no trace except the quantizers' initial values.
    """
    all_quantizers = [q for _, _, q in quantizers(model)]
    pending = [q for q in all_quantizers if not bool(q.initialized)]
    if not pending:
        for q in all_quantizers:
            q.refresh_host_state()
        return 0
    saved_buffers = {k: v.clone() for k, v in model.state_dict().items() if _is_norm_buffer(k)}
    for q in pending:
        q.calibrating = True
    used = 0
    try:
        for batch in batches:
            model(batch)
            used += 1
    finally:
        for q in pending:
            q.calibrating = False
        model.load_state_dict(saved_buffers, strict=False)
    for q in pending:
        q.finish_calibration()
    for q in all_quantizers:  # the training step then reads no buffer on the host (no sync, no graph break)
        q.refresh_host_state()
    return used


def _is_norm_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def learned_values(model: nn.Module) -> dict[str, float]:
    """Flat {'<layer>/<weight|act>/<param>': value} of every quantizer's learned values, for TensorBoard."""
    return {f"{layer}/{kind}/{key}": value
            for layer, kind, q in quantizers(model) for key, value in q.learned_values().items()}


def learned_table(model: nn.Module) -> str:
    """Markdown table of learned values per layer, weight and activation side by side (seed 000's alpha table)."""
    rows: dict[str, dict[str, float]] = {}
    for layer, kind, q in quantizers(model):
        for key, value in q.learned_values().items():
            rows.setdefault(layer, {})[f"{kind} {key}"] = value
    if not rows:
        return ""
    columns = sorted({c for r in rows.values() for c in r}, key=lambda c: (c.split(" ", 1)[1], c))
    lines = ["| layer | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for layer, values in rows.items():
        cells = [f"{values[c]:.4f}" if c in values else "" for c in columns]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def on_epoch_start(model: nn.Module, epoch: int) -> None:
    """Before each training epoch: let every module with a schedule (observer or BN-statistics freezing) act."""
    for module in model.modules():
        hook = getattr(module, "on_epoch_start", None)
        if module is not model and callable(hook):
            hook(epoch)


def load_float_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Load weights trained without (or with other) quantizers; returns the quantizer keys left at their defaults.

    Every stored tensor must find its place, and only quantizer state may be missing: anything else means the
    checkpoint belongs to another network.
    """
    quantizer_prefixes = tuple(f"{layer}.{'weight' if kind == 'weight' else 'input'}_quantizer."
                               for layer, kind, _ in quantizers(model))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(quantizer_prefixes)]
    if missing or result.unexpected_keys:
        raise QrunError(f"checkpoint weights do not fit this model (missing: {', '.join(missing) or 'none'}; "
                        f"unexpected: {', '.join(result.unexpected_keys) or 'none'})")
    return list(result.missing_keys)
