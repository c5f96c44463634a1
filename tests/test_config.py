"""Every option of every config group composes, and the contract keys behave as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from qrun.config import validate
from qrun.errors import QrunError
from tests.conftest import compose_config

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "dataset", "quant", "optimizer", "scheduler"])
def test_every_option_of_every_group_composes(group: str, tmp_path: Path) -> None:
    options = group_options(group)
    assert options, f"no options in configs/{group}"
    for option in options:
        overrides = [f"{group}={option}"]
        if group == "dataset":
            overrides.append(f"dataset.root={tmp_path}")
        cfg = compose_config(overrides, tmp_path)
        if group in ("model", "dataset", "quant", "optimizer", "scheduler"):
            assert cfg[group].name == option
        validate(cfg)


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    cfg = compose_config([], tmp_path)
    assert (cfg.model.name, cfg.dataset.name, cfg.quant.name) == ("cnn_bn", "fashion_mnist", "none")
    assert cfg.mode.value == "train" and cfg.resume is None


def test_bits_is_a_plain_int_and_w_a_bits_follow_it(tmp_path: Path) -> None:
    cfg = compose_config(["bits=2"], tmp_path)
    assert (cfg.bits, cfg.w_bits, cfg.a_bits) == (2, 2, 2)
    cfg = compose_config(["bits=4", "a_bits=8"], tmp_path)
    assert (cfg.w_bits, cfg.a_bits) == (4, 8)


@pytest.mark.parametrize("override", ["mode=bogus", "device=tpu", "bits=four", "epochs=1.5"])
def test_wrong_types_and_enum_values_fail_at_compose_time(override: str, tmp_path: Path) -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config([override], tmp_path)


@pytest.mark.parametrize("override, message", [
    ("bits=0", "bits=0 is out of range; accepted: an integer, 1 <= value <= 16"),
    ("w_bits=17", "w_bits=17 is out of range"),
    ("epochs=0", "epochs=0 is out of range"),
    ("dataset.train_samples=0", "dataset.train_samples=0 is out of range"),
    ("mode=evaluate", "mode=evaluate needs resume="),
    ("optimizer.name=lion", "unknown optimizer.name 'lion'; accepted: adam, adamw, sgd"),
    ("quant.first_last=half", "unknown quant.first_last 'half'; accepted: 8bit, fp, quantize"),
])
def test_range_errors_name_the_value_and_the_accepted_ones(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(QrunError, match=message.replace("(", r"\(").replace("=", "=")):
        validate(compose_config([override], tmp_path))
