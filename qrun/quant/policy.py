"""Which layers get quantized, at what bit widths: the layer policy behind `quantize_model`."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from torch import nn

from qrun.errors import QrunError, choice_error

FIRST_LAST_POLICIES = ("fp", "8bit", "quantize")
EDGE_BITS = 8  # the LSQ convention for the first and last layer
OVERRIDE_KEYS = ("w_bits", "a_bits", "quantize_input", "skip")


@dataclass(frozen=True)
class LayerPlan:
    """What one Conv2d/Linear becomes: skipped (float) or quantized with these settings."""

    name: str
    skip: bool
    w_bits: int
    a_bits: int
    quantize_input: bool
    edge: bool  # the first conv or last linear layer


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def edge_layer_names(layers: list[tuple[str, nn.Module]]) -> set[str]:
    """The first conv (the stem sees raw pixels) and the last linear (the classifier) in module order."""
    convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    edges = set()
    if convs:
        edges.add(convs[0])
    if linears:
        edges.add(linears[-1])
    elif layers:
        edges.add(layers[-1][0])  # an all-conv net (NIN) ends in a classifying conv
    return edges


def plan_layers(model: nn.Module, w_bits: int, a_bits: int, quantize_input: bool, first_last: str = "fp",
                layer_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None) -> list[LayerPlan]:
    if first_last not in FIRST_LAST_POLICIES:
        raise choice_error("first_last policy", first_last, FIRST_LAST_POLICIES)
    layers = quantizable_layers(model)
    edges = edge_layer_names(layers)
    overrides = dict(layer_overrides or {})
    _check_overrides(overrides, [n for n, _ in layers])
    plans = []
    for name, _ in layers:
        edge = name in edges
        settings = {"w_bits": w_bits, "a_bits": a_bits, "quantize_input": quantize_input, "skip": False}
        if edge and first_last == "fp":
            settings["skip"] = True
        elif edge and first_last == "8bit":
            settings.update(w_bits=EDGE_BITS, a_bits=EDGE_BITS)
        for pattern, values in overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                settings.update(values)
        plans.append(LayerPlan(name=name, edge=edge, skip=bool(settings["skip"]), w_bits=int(settings["w_bits"]),
                               a_bits=int(settings["a_bits"]), quantize_input=bool(settings["quantize_input"])))
    return plans


def _check_overrides(overrides: dict[str, Any], names: list[str]) -> None:
    for pattern, values in overrides.items():
        if not hasattr(values, "keys"):
            raise QrunError(f"layer override {pattern!r} must map to settings; accepted keys: {', '.join(OVERRIDE_KEYS)}")
        unknown = sorted(set(values) - set(OVERRIDE_KEYS))
        if unknown:
            raise QrunError(f"unknown key(s) {', '.join(unknown)} in layer override {pattern!r}; "
                            f"accepted: {', '.join(OVERRIDE_KEYS)}")
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise QrunError(f"layer override {pattern!r} matches no layer; layers: {', '.join(names)}")
