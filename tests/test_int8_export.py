"""ONNX QDQ export: values equal PyTorch's fake quantization, and onnxruntime runs the convs as integer kernels."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from qrun import quant
from qrun.errors import QrunError
from qrun.int8.export import INPUT, export_onnx, ort_session
from qrun.int8.ptq import calibrate_model
from qrun.models import get_model


def _calibrated(model_name: str, bits: int, per_channel: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = quant.quantize_model(get_model(model_name, num_classes=10, in_channels=1), "affine", bits, bits, True,
                                 "quantize", per_channel=per_channel)
    calibrate_model(model, [torch.randn(64, 1, 28, 28) for _ in range(3)])
    return model.eval()


@pytest.mark.parametrize("model_name, bits, per_channel", [("cnn_bn", 8, False), ("cnn_bn", 4, True),
                                                           ("cnn", 6, False)])
def test_onnxruntime_reproduces_fake_quant(model_name: str, bits: int, per_channel: bool, tmp_path: Path) -> None:
    model = _calibrated(model_name, bits, per_channel)
    path = export_onnx(model, tmp_path / "model.onnx", torch.randn(1, 1, 28, 28))
    x = torch.randn(128, 1, 28, 28)
    onnx_logits = torch.from_numpy(ort_session(path).run(None, {INPUT: x.numpy()})[0])
    with torch.no_grad():
        torch_logits = model(x)
    # Same grids, same int32 biases: equal up to float summation order (a rare rounding tie may flip one code).
    assert float((onnx_logits.argmax(1) == torch_logits.argmax(1)).float().mean()) >= 0.99
    assert float((onnx_logits - torch_logits).abs().median()) < 1e-5 * float(torch_logits.abs().max())


def test_onnxruntime_fuses_convs_into_integer_kernels(tmp_path: Path) -> None:
    path = export_onnx(_calibrated("cnn_bn", 8, False), tmp_path / "model.onnx", torch.randn(1, 1, 28, 28))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops and "FusedConv" not in ops
    assert "QGemm" in ops


def test_fp32_twin_has_no_quantization(tmp_path: Path) -> None:
    model = _calibrated("cnn_bn", 8, False)
    path = export_onnx(model, tmp_path / "fp32.onnx", torch.randn(1, 1, 28, 28), quantize=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}


def test_quantizers_without_an_integer_grid_are_refused(tmp_path: Path) -> None:
    model = quant.quantize_model(get_model("cnn", num_classes=10, in_channels=1), "dsq", 4, 4, True, "quantize")
    quant.initialize_from_data(model, [torch.randn(8, 1, 28, 28)])
    with pytest.raises(QrunError, match="no integer grid"):
        export_onnx(model.eval(), tmp_path / "m.onnx", torch.randn(1, 1, 28, 28))
