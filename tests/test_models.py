"""The model registry: strict names, paper parameter counts, shapes from the dataset."""

from __future__ import annotations

import pytest
import torch

from qrun.errors import QrunError
from qrun.models import available_models, get_model
from qrun.models.registry import register_model

EXPECTED = ["cnn", "cnn_bn", "nin", "resnet18", "resnet20", "resnet32", "resnet34", "resnet44", "resnet50", "resnet56"]


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_family_member() -> None:
    assert available_models() == EXPECTED


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(QrunError, match=r"unknown model 'resnet21'; accepted: cnn, cnn_bn, nin, resnet18"):
        get_model("resnet21", num_classes=10, in_channels=3)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("cnn")(lambda **_: torch.nn.Identity())


@pytest.mark.parametrize("name, millions", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66),
                                            ("resnet56", 0.85)])
def test_cifar_resnets_match_he_et_al_parameter_counts(name: str, millions: float) -> None:
    assert parameter_count(get_model(name, 10, 3)) / 1e6 == pytest.approx(millions, abs=0.006)


def test_resnet18_matches_torchvision_count() -> None:
    assert parameter_count(get_model("resnet18", 1000, 3)) == 11_689_512


@pytest.mark.parametrize("name, channels, size, classes", [
    ("cnn", 1, 28, 10), ("cnn_bn", 3, 32, 100), ("nin", 3, 32, 10), ("resnet20", 1, 28, 10),
    ("resnet18", 1, 64, 7),
])
def test_models_take_the_dataset_shape(name: str, channels: int, size: int, classes: int) -> None:
    model = get_model(name, num_classes=classes, in_channels=channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)


def test_nin_is_conv_bn_relu_with_seed_002_widths() -> None:
    convs = [m for m in get_model("nin", 10, 3).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [192, 160, 96, 192, 192, 192, 192, 192, 10]
    assert convs[0].kernel_size == (5, 5)
