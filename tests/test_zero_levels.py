"""scripts/zero_levels.py: the share of level-0 outputs per quantizer side, on real Fashion-MNIST images."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from qrun.models import get_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "zero_levels.py"


def load_script():
    spec = importlib.util.spec_from_file_location("zero_levels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_max_scaled_2_bit_grid_puts_more_on_level_zero_than_lsq(fashion_mnist_available: None) -> None:
    script = load_script()
    torch.manual_seed(0)
    checkpoint = {"model": get_model("resnet20", num_classes=10, in_channels=1).state_dict()}
    raw = torch.from_numpy(script.read_idx(script.FASHION_MNIST)[:256].copy()).float().div(255)
    images = ((raw - script.MEAN) / script.STD).unsqueeze(1)
    uniform = script.zero_shares(checkpoint, "uniform", 2, 2, images)
    lsq = script.zero_shares(checkpoint, "lsq", 2, 2, images)
    assert len(uniform["weight"]) == len(uniform["act"]) == 18  # every inner conv, both sides
    assert all(0.0 <= s <= 1.0 for s in uniform["weight"] + uniform["act"])
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert mean(uniform["weight"]) > mean(lsq["weight"]) + 0.2
