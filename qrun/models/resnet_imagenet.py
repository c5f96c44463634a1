"""ImageNet ResNets from torchvision, with the stem adapted when the input is not RGB."""

from __future__ import annotations

from torch import nn
from torchvision import models as tv_models

from qrun.models.registry import register_model


def _torchvision_resnet(arch: str, num_classes: int, in_channels: int, **options) -> nn.Module:
    model = getattr(tv_models, arch)(weights=None, num_classes=num_classes, **options)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _register(arch: str) -> None:
    @register_model(arch)
    def build(num_classes: int, in_channels: int, **options) -> nn.Module:
        return _torchvision_resnet(arch, num_classes, in_channels, **options)


for _arch in ("resnet18", "resnet34", "resnet50"):
    _register(_arch)
