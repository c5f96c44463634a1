"""PTQ, QAT from a float checkpoint, integer-only inference and ONNX export on real Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from conftest import compose_config, run_training

from qrun import checkpoint
from qrun.data import build_datasets
from qrun.errors import QrunError
from qrun.int8.integer import layerwise_agreement, to_integer
from qrun.trainer import build_model

DATA = ["dataset.train_samples=8000", "dataset.val_samples=2000"]
TINY = ["dataset.train_samples=512", "dataset.val_samples=256"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_available: None) -> dict[str, Path]:
    """A float cnn_bn trained for one epoch on 8000 images, and its 8-bit and 4-bit PTQ calibrations."""
    root = tmp_path_factory.mktemp("int8")
    paths = {"fp": root / "fp", "ptq8": root / "ptq8", "ptq4": root / "ptq4"}
    run_training([*DATA, "epochs=1"], paths["fp"])
    for bits in (8, 4):
        run_training([*DATA, "mode=calibrate", "quant=affine", f"bits={bits}", f"resume={paths['fp']}",
                      "calib_batches=16"], paths[f"ptq{bits}"])
    return paths


def _results(path: Path) -> dict:
    import json

    return json.loads((path / "results.json").read_text())


def test_ptq_8bit_loses_less_than_half_a_point(runs: dict[str, Path]) -> None:
    ptq = _results(runs["ptq8"])
    assert ptq["float_top1"] == _results(runs["fp"])["top1"]
    assert ptq["float_top1"] > 80.0
    assert ptq["top1"] > ptq["float_top1"] - 0.5
    assert ptq["best_top1"] == ptq["top1"]  # the calibrated model's only evaluation
    # The calibrated checkpoint evaluates to the same top-1.
    evaluated = run_training([*DATA, "mode=evaluate", "quant=affine", "bits=8", f"resume={runs['ptq8']}"],
                             runs["ptq8"] / "eval")
    assert evaluated["top1"] == ptq["top1"]


def test_integer_only_matches_fake_quant_within_one_step_per_layer(runs: dict[str, Path]) -> None:
    cfg = compose_config([*DATA, "quant=affine", "bits=8"], runs["ptq8"] / "unused")
    model = build_model(cfg)
    model.load_state_dict(checkpoint.load(runs["ptq8"] / "checkpoints" / checkpoint.BEST)["model"])
    model.eval()
    integer_model = to_integer(model)
    data = build_datasets(cfg.dataset)
    images = torch.stack([data.test[i][0] for i in range(256)])
    steps = layerwise_agreement(model, integer_model, images)
    assert set(steps) == {"features.0", "features.4", "classifier"}
    assert all(value <= 1.0 + 1e-3 for value in steps.values()), steps
    agree = (integer_model(images).argmax(1) == model(images).argmax(1)).float().mean()
    assert float(agree) >= 0.995


def test_export_writes_qdq_onnx_that_onnxruntime_runs(runs: dict[str, Path]) -> None:
    out = runs["ptq8"] / "export"
    results = run_training([*DATA, "mode=export", "quant=affine", "bits=8", f"resume={runs['ptq8']}"], out)
    graph = onnx.load(str(out / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    # One Q/DQ per layer input plus one on each conv output (so onnxruntime forms QLinearConv groups).
    assert ops.count("QuantizeLinear") == 5 and ops.count("DequantizeLinear") >= 8
    # Weights are stored as 8-bit codes (uint8 with zero point 128, see shift_to_unsigned), biases as int32.
    int8_weights = [i for i in graph.initializer
                    if i.data_type == onnx.TensorProto.UINT8 and i.name.endswith("_quantized")]
    int32_biases = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT32 and i.name.endswith("_int32")]
    assert len(int8_weights) == 3 and len(int32_biases) == 3
    assert "QuantizeLinear" not in [n.op_type for n in onnx.load(str(out / "model_fp32.onnx")).graph.node]
    assert abs(results["onnx_int8_top1"] - results["top1"]) <= 0.3
    assert results["best_top1"] == _results(runs["ptq8"])["best_top1"]  # carried over from the checkpoint
    assert abs(results["integer_top1"] - results["top1"]) <= 0.1
    # The float export of the calibrated model is the float network with BN folded in.
    assert abs(results["onnx_fp32_top1"] - _results(runs["fp"])["top1"]) <= 0.1


def test_qat_from_float_checkpoint_recovers_4bit_accuracy(runs: dict[str, Path], tmp_path: Path) -> None:
    qat = run_training(["dataset.train_samples=4000", "dataset.val_samples=2000", "quant=affine", "bits=4",
                        f"init_from={runs['fp']}", "epochs=1", "optimizer.lr=2e-4"], tmp_path / "qat")
    assert qat["top1"] > _results(runs["ptq4"])["top1"]


@pytest.mark.parametrize("name", ["uniform", "lsq"])
def test_uniform_and_lsq_runs_export_to_qdq(name: str, tmp_path: Path, fashion_mnist_available: None) -> None:
    common = [*TINY, f"quant={name}", "bits=8", "quantize_input=true", "model=cnn"]
    run_training([*common, "epochs=1"], tmp_path / "train")
    results = run_training([*common, "mode=export", f"resume={tmp_path / 'train'}"], tmp_path / "export")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "export" / "model.onnx")).graph.node]
    assert "QuantizeLinear" in ops
    assert abs(results["onnx_int8_top1"] - results["top1"]) <= 1.0  # 256 images: at most 2 flips


def test_bad_requests_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(QrunError, match="needs a quantizer"):
        run_training([*TINY, "mode=calibrate", f"resume={runs['fp']}"], tmp_path / "a")
    with pytest.raises(QrunError, match="takes a float checkpoint"):
        run_training([*TINY, "mode=calibrate", "quant=affine", "bits=8", f"resume={runs['ptq8']}"], tmp_path / "b")
    with pytest.raises(QrunError, match="is for model=cnn_bn"):
        run_training([*TINY, "model=cnn", "quant=affine", f"init_from={runs['fp']}"], tmp_path / "c")
    with pytest.raises(QrunError, match="needs a quantized run"):
        run_training([*TINY, "mode=export", f"resume={runs['fp']}"], tmp_path / "e")
    with pytest.raises(QrunError, match="calib_batches=0"):
        run_training([*TINY, "mode=calibrate", "quant=affine", "calib_batches=0", f"resume={runs['fp']}"],
                     tmp_path / "d")
