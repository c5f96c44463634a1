"""Network-in-Network for CIFAR (Lin et al. 2014) in the conv-BN-ReLU form used by XNOR-Net's CIFAR script."""

from __future__ import annotations

from torch import nn

from qrun.models.registry import register_model


def _block(in_channels: int, out_channels: int, kernel: int, padding: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel, padding=padding, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class NIN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_block(in_channels, 192, 5, 2), *_block(192, 160, 1, 0), *_block(160, 96, 1, 0),
            nn.MaxPool2d(3, stride=2, padding=1), nn.Dropout(dropout),
            *_block(96, 192, 5, 2), *_block(192, 192, 1, 0), *_block(192, 192, 1, 0),
            nn.AvgPool2d(3, stride=2, padding=1), nn.Dropout(dropout),
            *_block(192, 192, 3, 1), *_block(192, 192, 1, 0),
            # The classifying 1x1 conv is the network's last layer: no BN/ReLU after it.
            nn.Conv2d(192, num_classes, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


@register_model("nin")
def nin(num_classes: int, in_channels: int, **options) -> nn.Module:
    return NIN(num_classes, in_channels, **options)
