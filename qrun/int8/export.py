"""ONNX export with QuantizeLinear/DequantizeLinear pairs, and evaluation of ONNX files in onnxruntime.

Every quantized layer becomes: Q/DQ on its input (its input grid), a DequantizeLinear of int8 weights, an int32
bias dequantized with scale S_x S_w, then the float Conv/Gemm. onnxruntime's QDQ transformer recognises these
groups and runs them as integer kernels (QLinearConv, QGemm...). torch.onnx.export writes the Q/DQ pairs from
torch.fake_quantize_* calls; a post-pass stores the constant weights as int8 and the biases as int32 initializers.
Grids narrower than int8/uint8 (4 or 6 bits, the symmetric -127..127 weights) are exported as the storage type
plus a Clip to the grid's real range: the same values, since the grid's ends are grid points.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from qrun.errors import QrunError
from qrun.int8.fold import FoldedConvBN
from qrun.int8.grids import STORAGE, Grid, effective_weight_bias, grid_of, quantized_conv, require_storage
from qrun.quant.layers import QuantizedLayer

OPSET = 13  # per-channel QuantizeLinear (axis) needs opset 13
INPUT, OUTPUT = "input", "logits"


class QDQ(nn.Module):
    """Fake quantization that torch.onnx.export writes as QuantizeLinear + DequantizeLinear (+ Clip if narrower)."""

    def __init__(self, grid: Grid, what: str, constant: bool = False) -> None:
        super().__init__()
        self.storage_min, self.storage_max = STORAGE[require_storage(grid, what)]
        self.axis = grid.axis
        self.register_buffer("scale", grid.scale.float().clone())
        self.register_buffer("zero_point", grid.zero_point.to(torch.int32).clone())
        self.grid = grid
        narrower = (grid.qmin, grid.qmax) != (self.storage_min, self.storage_max)
        if narrower and grid.axis is not None and not constant:
            raise QrunError(f"{what}: a per-channel grid narrower than int8/uint8 exists for weights only")
        # Real ends of the grid, for a Clip node; None when the storage type's range is the grid, or for a
        # constant (weights), which `clamp_constant` clips once before export.
        self.bounds = (float((grid.qmin - grid.zero_point) * grid.scale),
                       float((grid.qmax - grid.zero_point) * grid.scale)) if narrower and not constant else None

    def clamp_constant(self, t: torch.Tensor) -> torch.Tensor:
        """Clip a constant to the grid's real range (per channel), so storage-range Q/DQ gives the grid's values."""
        lo = self.grid.dequantize(torch.full_like(self.grid.zero_point, self.grid.qmin))
        hi = self.grid.dequantize(torch.full_like(self.grid.zero_point, self.grid.qmax))
        shape = [-1] + [1] * (t.dim() - 1) if self.grid.axis is not None else []
        return torch.clamp(t, lo.reshape(shape) if shape else lo, hi.reshape(shape) if shape else hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bounds is not None:
            x = torch.clamp(x, *self.bounds)
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero_point),
                                                         self.storage_min, self.storage_max)
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis,
                                                      self.storage_min, self.storage_max)


def shift_to_unsigned(grid: Grid) -> Grid:
    """The same real values on uint8 codes: q + 128 with zero point Z + 128 (int8 weights -> uint8 weights).

    onnxruntime's x86 kernels multiply uint8 activations by int8 weights with VPMADDUBSW, which adds pairs of
    products in saturating int16: 2 x 255 x 127 overflows it, so u8s8 results drift from exact integer maths on
    CPUs without VNNI (onnxruntime's quantization docs: reduce_range or U8U8). uint8 weights take the exact
    u8u8 path and keep the grid's full 8 bits.
    """
    if grid.storage != "int8" or grid.qmin < -128 or grid.qmax > 127:
        return grid
    return Grid(grid.scale, grid.zero_point + 128, grid.qmin + 128, grid.qmax + 128, grid.axis)


class ExportLayer(nn.Module):
    """A quantized (possibly BN-folded) conv or linear layer in export form, or its float twin."""

    def __init__(self, name: str, layer: nn.Module, quantize: bool, output_grid: Optional[Grid] = None,
                 unsigned_weights: bool = True) -> None:
        super().__init__()
        inner = quantized_conv(layer)
        weight, bias = effective_weight_bias(layer)
        self.conv = isinstance(inner, nn.Conv2d)
        self.conv_args = (inner.stride, inner.padding, inner.dilation, inner.groups) if self.conv else ()
        self.input_qdq = self.weight_qdq = None
        if quantize and inner.input_quantizer is not None:
            self.input_qdq = QDQ(grid_of(inner.input_quantizer), f"layer {name} inputs")
        if quantize and inner.weight_quantizer is not None:
            grid = grid_of(inner.weight_quantizer, weight)
            grid = shift_to_unsigned(grid) if unsigned_weights else grid
            self.weight_qdq = QDQ(grid, f"layer {name} weights", constant=True)
            weight = self.weight_qdq.clamp_constant(weight)
        # The next layer's input grid, applied to this layer's output when only ReLU, max pooling and flatten lie
        # between: those commute with the grid (monotonic, 0 on the grid), so values are unchanged, and the
        # explicit DQ -> Conv -> Q group lets onnxruntime run the layer as QLinearConv.
        self.output_qdq = QDQ(output_grid, f"layer {name} outputs") if output_grid is not None else None
        self.register_buffer("weight", weight.clone().contiguous())
        self.register_buffer("bias", None if bias is None else bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        weight = self.weight if self.weight_qdq is None else self.weight_qdq(self.weight)
        out = F.conv2d(x, weight, self.bias, *self.conv_args) if self.conv else F.linear(x, weight, self.bias)
        return out if self.output_qdq is None else self.output_qdq(out)


def export_module(model: nn.Module, quantize: bool = True, example: Optional[torch.Tensor] = None) -> nn.Module:
    """A copy of `model` in eval form with every quantized layer replaced by an ExportLayer.

    With an example input, adaptive pools that are identities at its size (cnn's 7x7 -> 7x7) are dropped: an
    AveragePool between a conv and the next QuantizeLinear stops onnxruntime from fusing that conv into an
    integer QLinearConv.
    """
    exported = copy.deepcopy(model).cpu().eval()
    dropped = _drop_identity_pools(exported, example) if example is not None else set()
    output_grids = _output_grids(model, dropped) if quantize else {}
    exported._load_state_dict_pre_hooks.clear()
    targets = [(n, m) for n, m in exported.named_modules()
               if isinstance(m, FoldedConvBN) or (isinstance(m, QuantizedLayer) and not _inside_folded(exported, n))]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = exported.get_submodule(parent_name) if parent_name else exported
        setattr(parent, child, ExportLayer(name, module, quantize, output_grids.get(name)))
    return exported.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def _drop_identity_pools(model: nn.Module, example: torch.Tensor) -> set[str]:
    pools = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))]
    identities: list[str] = []
    handles = [m.register_forward_hook(lambda _m, args, out, name=n: identities.append(name)
                                       if out.shape == args[0].shape else None) for n, m in pools]
    try:
        model(example.cpu().float())
    finally:
        for handle in handles:
            handle.remove()
    for name in set(identities):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return set(identities)


GRID_COMMUTING = (nn.ReLU, nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Flatten)


def _output_grids(model: nn.Module, identity_pools: set[str]) -> dict[str, Grid]:
    """Layer name -> the next layer's input grid, where only grid-commuting ops separate the two layers."""
    from qrun.int8.integer import _chain

    try:
        chain = _chain(model)
    except QrunError:
        return {}  # not a chain (residual nets): export without output Q/DQ, still correct
    layers = [i for i, (_, m) in enumerate(chain) if isinstance(m, (QuantizedLayer, FoldedConvBN))]
    grids = {}
    for index, following in zip(layers, layers[1:]):
        between = chain[index + 1:following]
        quantizer = quantized_conv(chain[following][1]).input_quantizer
        if quantizer is None or not all(isinstance(m, GRID_COMMUTING) or n in identity_pools for n, m in between):
            continue
        grid = grid_of(quantizer)
        if grid.storage is not None and grid.axis is None:
            grids[chain[index][0]] = grid
    return grids


def _inside_folded(model: nn.Module, name: str) -> bool:
    parent_name = name.rpartition(".")[0]
    return bool(parent_name) and isinstance(model.get_submodule(parent_name), FoldedConvBN)


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor, quantize: bool = True) -> Path:
    """Write `model` (quantized: QDQ; else its float twin) to `path` with a dynamic batch axis."""
    module = export_module(model, quantize, example)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice (onnxscript is not needed)
        torch.onnx.export(module, (example.cpu().float().contiguous(),), str(path), dynamo=False,
                          opset_version=OPSET, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, do_constant_folding=True)
    if quantize:
        import onnx

        graph_model = onnx.load(str(path))
        store_integer_constants(graph_model)
        onnx.checker.check_model(graph_model)
        onnx.save(graph_model, str(path))
    return path


# ------------------------------------------------------------------------------------------------ ONNX post-pass
def store_integer_constants(model: Any) -> None:
    """Quantize constant weights into int8/uint8 initializers and biases into int32 ones (Jacob et al. 2.4)."""
    from onnx import numpy_helper

    graph = model.graph
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producers = {out: node for node in graph.node for out in node.output}
    _fold_weight_quantization(graph, consts)
    producers = {out: node for node in graph.node for out in node.output}
    _quantize_biases(graph, consts, producers)
    _drop_unused_initializers(graph)


def _axis(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _fold_weight_quantization(graph: Any, consts: dict[str, np.ndarray]) -> None:
    from onnx import numpy_helper

    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in consts:
            continue
        value, scale, zero_point = (consts[name] for name in node.input[:3])
        axis = _axis(node)
        shape = [1] * value.ndim
        if scale.ndim == 1 and value.ndim > 0:
            shape[axis] = -1
        info = np.iinfo(zero_point.dtype)
        codes = np.rint(value / scale.reshape(shape)) + zero_point.reshape(shape).astype(np.int64)
        codes = np.clip(codes, info.min, info.max).astype(zero_point.dtype)  # rint: half to even, as ONNX
        name = f"{node.input[0]}_quantized"
        graph.initializer.append(numpy_helper.from_array(codes, name))
        consts[name] = codes
        for consumer in graph.node:
            for i, inp in enumerate(consumer.input):
                if inp == node.output[0]:
                    consumer.input[i] = name
        graph.node.remove(node)


def _quantize_biases(graph: Any, consts: dict[str, np.ndarray], producers: dict[str, Any]) -> None:
    from onnx import helper, numpy_helper

    for node in list(graph.node):
        bias_index = {"Conv": 2, "Gemm": 2}.get(node.op_type)
        if bias_index is None or len(node.input) <= bias_index or node.input[bias_index] not in consts:
            continue
        x_dq, w_dq = producers.get(node.input[0]), producers.get(node.input[1])
        if not (x_dq and w_dq and x_dq.op_type == w_dq.op_type == "DequantizeLinear"):
            continue
        bias = consts[node.input[bias_index]].astype(np.float64)
        scale = (consts[x_dq.input[1]].astype(np.float64) * consts[w_dq.input[1]].astype(np.float64)).reshape(-1)
        scale = np.broadcast_to(scale, bias.shape) if scale.size == 1 else scale
        codes = np.rint(bias / scale)
        if np.abs(codes).max(initial=0) >= 2**31:
            continue  # does not fit int32: leave the float bias
        prefix = node.input[bias_index]
        graph.initializer.extend([
            numpy_helper.from_array(codes.astype(np.int32), f"{prefix}_int32"),
            numpy_helper.from_array(scale.astype(np.float32), f"{prefix}_scale"),
            numpy_helper.from_array(np.zeros(bias.shape, np.int32), f"{prefix}_zero_point")])
        dq = helper.make_node("DequantizeLinear", [f"{prefix}_int32", f"{prefix}_scale", f"{prefix}_zero_point"],
                              [f"{prefix}_dequantized"], name=f"{prefix}_DequantizeLinear", axis=0)
        graph.node.insert(list(graph.node).index(node), dq)
        node.input[bias_index] = f"{prefix}_dequantized"


def _drop_unused_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)


# ------------------------------------------------------------------------------------------------- onnxruntime
def ort_session(path: Path, threads: Optional[int] = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_evaluate(path: Path, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Top-1 and top-5 of an ONNX classifier over (images, targets) batches, run by onnxruntime on the CPU."""
    session = ort_session(path)
    samples = hits1 = hits5 = 0
    start = time.perf_counter()
    for images, targets in batches:
        logits = torch.from_numpy(session.run(None, {INPUT: images.float().contiguous().numpy()})[0])
        top = logits.topk(min(5, logits.size(1)), dim=1).indices
        correct = top.eq(targets.unsqueeze(1))
        hits1 += int(correct[:, 0].sum())
        hits5 += int(correct.any(dim=1).sum())
        samples += targets.numel()
    return {"top1": 100.0 * hits1 / max(samples, 1), "top5": 100.0 * hits5 / max(samples, 1), "samples": samples,
            "time_s": time.perf_counter() - start}


def count_ops(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
