"""Quantization: one file per quantizer behind one interface, drop-in layers, and the layer policy.

Importing this package registers every quantizer.
"""

from qrun.quant.base import Quantizer, available_quantizers, build_quantizer, register_quantizer
from qrun.quant.layers import QuantConv2d, QuantizedLayer, QuantLinear
from qrun.quant.model import (
    FULL_PRECISION,
    initialize_from_data,
    learned_table,
    learned_values,
    load_float_state,
    on_epoch_start,
    quantize_model,
    quantizer_parameters,
    quantizers,
)

__all__ = [
    "FULL_PRECISION", "QuantConv2d", "QuantLinear", "Quantizer", "QuantizedLayer", "available_quantizers",
    "build_quantizer", "initialize_from_data", "learned_table", "learned_values", "load_float_state",
    "on_epoch_start", "quantize_model",
    "quantizer_parameters", "quantizers", "register_quantizer",
]

# Importing a quantizer module registers it.
from qrun.quant import affine, dorefa, dsq, lsq, pact, twn, uniform, xnor  # noqa: E402,F401
