"""Starting from weights made elsewhere: torchvision's cache (model.pretrained) and plain state-dict files (init_from)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from qrun import weights
from qrun.errors import QrunError
from qrun.models import get_model
from qrun.quant import quantize_model
from qrun.trainer import load_initial_weights
from tests.conftest import SMALL_DATA, compose_config, run_training


def test_pretrained_offline_without_the_file_is_one_line_naming_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(QrunError) as error:
        weights.load_pretrained(get_model("resnet18", 10, 3), "resnet18")
    message = str(error.value)
    assert "\n" not in message and "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message and "download.pytorch.org" in message
    with pytest.raises(QrunError, match="accepted: resnet18, resnet34, resnet50"):
        weights.load_pretrained(get_model("resnet20", 10, 3), "resnet20")


def test_pretrained_loads_the_cached_file_and_refits_the_classifier(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    imagenet = get_model("resnet18", 1000, 3)  # stands in for torchvision's file (same keys and shapes)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(imagenet.state_dict(), cache / "resnet18-f37072fd.pth")
    torch.manual_seed(2)
    model = quantize_model(get_model("resnet18", 10, 3), "lsq", 4, 4, True)
    fresh_fc = model.fc.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="qrun.weights"):
        weights.load_pretrained(model, "resnet18")
    assert torch.equal(model.layer3[1].conv2.weight, imagenet.layer3[1].conv2.weight)
    assert torch.equal(model.bn1.running_var, imagenet.bn1.running_var)
    assert torch.equal(model.fc.weight, fresh_fc) and model.fc.weight.shape == (10, 512)
    assert "classifier fc re-initialised" in caplog.text and "(1000, 512)" in caplog.text


def saved_variants(state: dict[str, torch.Tensor]) -> dict[str, object]:
    return {"plain": state, "data_parallel": {f"module.{k}": v for k, v in state.items()},
            "state_dict": {"state_dict": state, "epoch": 3}, "model": {"model": state, "optimizer": {}}}


@pytest.mark.parametrize("variant", ["plain", "data_parallel", "state_dict", "model"])
def test_plain_state_dict_files_load_into_a_quantized_model(variant: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = get_model("resnet20", 10, 1)
    path = tmp_path / "weights.pth"
    torch.save(saved_variants(source.state_dict())[variant], path)
    model = quantize_model(get_model("resnet20", 10, 1), "dsq", 4, 4, True)
    cfg = compose_config(["model=resnet20", "quant=dsq"], tmp_path)
    load_initial_weights(model, weights.read_initial(path), cfg, path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not bool(model.layer1[0].conv1.weight_quantizer.initialized)  # ranges come from data afterwards


def test_misfitting_weights_are_one_error_listing_the_keys(tmp_path: Path) -> None:
    state = get_model("resnet20", 10, 1).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(32, 8, 3, 3)
    del state["layer3.2.bn2.running_mean"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    model = get_model("resnet20", 10, 1)
    with pytest.raises(QrunError, match=r"layer2\.0\.conv1\.weight \(32, 8, 3, 3\) vs model \(32, 16, 3, 3\)"):
        weights.fit_state(model, weights.read_initial(path)["model"], path)
    state["layer2.0.conv1.weight"] = model.layer2[0].conv1.weight.detach()
    torch.save(state, path)
    with pytest.raises(QrunError, match=r"missing: layer3\.2\.bn2\.running_mean; unexpected: extra\.weight"):
        weights.fit_state(model, weights.read_initial(path)["model"], path)


def test_files_that_are_not_weights_are_refused_safely(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.pth"
    torch.save({"weights": Path("/")}, pickled)  # an arbitrary object: weights_only=True refuses to unpickle it
    with pytest.raises(QrunError, match="weights_only=True"):
        weights.read_initial(pickled)
    numbers = tmp_path / "numbers.pth"
    torch.save({"epoch": 3}, numbers)
    with pytest.raises(QrunError, match="not a qrun checkpoint"):
        weights.read_initial(numbers)


def test_init_from_a_plain_dict_with_1000_classes_trains(tmp_path: Path, fashion_mnist_available, caplog) -> None:
    torch.manual_seed(0)
    source = get_model("cnn_bn", 1000, 1)
    torch.save(source.state_dict(), tmp_path / "imagenet_head.pth")
    with caplog.at_level(logging.INFO):
        results = run_training(["model=cnn_bn", "quant=lsq", "quantize_input=true", "epochs=1",
                                f"init_from={tmp_path / 'imagenet_head.pth'}", *SMALL_DATA], tmp_path / "run")
    assert results["status"] == "finished" and results["top1"] > 30
    assert "classifier classifier re-initialised" in caplog.text
    assert "initialised quantizers from" in caplog.text
