"""One real epoch of quantized training per quantizer on a Fashion-MNIST subset, through the trainer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import qrun.quant
from conftest import SMALL_DATA, run_training

pytestmark = pytest.mark.usefixtures("fashion_mnist_available")

CASES = [  # quantizer, bits, quantize_input
    ("dsq", 4, True), ("uniform", 4, True), ("lsq", 4, True), ("pact", 4, True), ("dorefa", 2, True),
    ("xnor", 1, True), ("twn", 2, False),
]
# PACT's alpha gets a gradient only from inputs at or above alpha (eq. 3). Calibrated alpha is the mean of the
# calibration batches' maxima, so in 4 training steps the classifier's input may exceed it in a handful of elements
# of one step or in none: measured, that gradient was -5e-9 with 1 thread and 3e-19 with 2 (float reduction order
# picks which elements cross), below Adam's eps of 1e-8, so whether alpha moved depended on the machine. A fixed
# alpha of 1.0 lies far inside every layer's range here: thousands of elements clip each step and alpha moves
# by about one learning rate per step on any machine.
OPTIONS = {"pact": ["quant.options.init_alpha=1.0"]}


@pytest.mark.parametrize("name, bits, quantize_input", CASES)
def test_one_quantized_epoch_trains_and_moves_learned_values(name: str, bits: int, quantize_input: bool,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calibrated: dict[str, float] = {}
    calibrate = qrun.quant.initialize_from_data

    def recording(model, batches):
        used = calibrate(model, batches)
        calibrated.update(qrun.quant.learned_values(model))
        return used

    monkeypatch.setattr(qrun.quant, "initialize_from_data", recording)
    results = run_training([*SMALL_DATA, f"quant={name}", f"bits={bits}", f"quantize_input={quantize_input}",
                            "epochs=1", "model=cnn_bn", "quant.first_last=quantize", *OPTIONS.get(name, [])],
                            tmp_path)
    assert results["quant"] == name and results["w_bits"] == bits
    assert math.isfinite(results["train_loss"]) and results["top1"] > 10.0
    payload = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    state = payload["model"]
    table = (tmp_path / "learned_params.md").read_text() if calibrated else ""
    moved = []
    for key, before in calibrated.items():
        layer, kind, param = key.split("/")
        slot = "weight_quantizer" if kind == "weight" else "input_quantizer"
        after = state[f"{layer}.{slot}.{param}"].item()
        moved.append(after != pytest.approx(before, rel=1e-6, abs=1e-9))
        # Learned parameters must all move; uniform's observed range may legitimately stay put on a layer whose
        # input maximum is constant (normalised pixels), but not everywhere.
        assert moved[-1] or param == "range", f"{key} did not move from {before}"
        assert layer in table
    assert any(moved) or not calibrated
