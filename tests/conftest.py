"""Shared fixtures: compose real configs with Hydra's compose API and run them in a temporary folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from qrun.config import register_configs
from qrun.data import DEBIAN_FASHION_MNIST

register_configs()

# Small but real: a seeded subset of genuine Fashion-MNIST.
SMALL_DATA = ["dataset.train_samples=512", "dataset.val_samples=256"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: skipped here and in CI, run by scripts/gpu_check.sh on a GPU machine."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The config `qrun <overrides>` would run, writing into output_dir, without progress bars."""
    with initialize_config_module(config_module="qrun.configs", version_base="1.3"):
        return compose("config", overrides=[*overrides, f"output_dir={output_dir}", "progress=false"])


def run_training(overrides: list[str], output_dir: Path) -> dict[str, Any]:
    from qrun.trainer import run

    # The overrides say which keys were typed: a resume or evaluation takes every other key from the checkpoint.
    return run(compose_config(overrides, output_dir), overrides=overrides)


@pytest.fixture(scope="session")
def fashion_mnist_available() -> None:
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"real Fashion-MNIST is missing from {DEBIAN_FASHION_MNIST}: apt-get install dataset-fashion-mnist")
