"""Recipe presets (configs/experiment, `qrun +experiment=<name>`): every one composes, validates and cites a source."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qrun.config import validate
from tests.conftest import compose_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiment"
PRESETS = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
# Every preset fixes the whole recipe, not just a model and a dataset.
RECIPE_KEYS = ("epochs", "batch_size", "optimizer", "scheduler")


def test_the_required_presets_exist() -> None:
    assert {"cifar10_resnet20_float", "cifar10_resnet20_qat", "imagenet_resnet18_lsq", "imagenet_resnet18_dsq",
            "fmnist_resnet20_float", "fmnist_resnet20_qat"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_validates_and_names_its_source(name: str, tmp_path: Path) -> None:
    text = (EXPERIMENTS / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert re.search(r"(et al\.|section|Table).*(19|20)\d\d|(19|20)\d\d.*(section|Table)", text, re.S), \
        "a preset names its source paper and section"
    recipe = yaml.safe_load(text)
    groups = {list(entry)[0].split("/")[-1]: list(entry.values())[0] for entry in recipe["defaults"]}
    assert {"model", "dataset", "quant", "optimizer", "scheduler"} <= set(groups)
    assert set(RECIPE_KEYS) <= set(recipe) and "weight_decay" in recipe["optimizer"]
    cfg = compose_config([f"+experiment={name}", f"dataset.root={tmp_path}"], tmp_path)
    validate(cfg)
    for group, option in groups.items():
        assert cfg[group].name == option
    for key in ("epochs", "batch_size"):
        assert cfg[key] == recipe[key]
    for key, value in recipe["optimizer"].items():
        assert cfg.optimizer[key] == pytest.approx(value)


@pytest.mark.parametrize("quant", ["uniform", "lsq", "dsq", "pact", "dorefa", "affine"])
def test_command_line_choices_override_the_preset(quant: str, tmp_path: Path) -> None:
    cfg = compose_config(["+experiment=fmnist_resnet20_qat", f"quant={quant}", "bits=2", "epochs=1"], tmp_path)
    validate(cfg)
    assert (cfg.quant.name, cfg.bits, cfg.w_bits, cfg.epochs) == (quant, 2, 2, 1)
    assert cfg.optimizer.lr == 0.01 and cfg.quant.first_last == "fp"  # the recipe's, whatever the quantizer


def test_cfg_job_shows_the_composed_recipe(tmp_path: Path) -> None:
    qrun = Path(sys.executable).with_name("qrun")
    out = subprocess.run([str(qrun), "--cfg", "job", "+experiment=imagenet_resnet18_lsq", "bits=2",
                          "optimizer.weight_decay=2.5e-5"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["model"] == {"name": "resnet18", "options": {}, "pretrained": True}
    assert (shown["quant"]["name"], shown["quant"]["first_last"], shown["bits"]) == ("lsq", "8bit", 2)
    assert shown["optimizer"]["weight_decay"] == 2.5e-5 and shown["scheduler"]["name"] == "cosine"
    assert shown["epochs"] == 90
