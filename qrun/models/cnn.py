"""The small nets of seed 004: two 3x3 conv layers and a linear head, without and with BatchNorm."""

from __future__ import annotations

from torch import nn

from qrun.models.registry import register_model


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, batch_norm: bool, widths: tuple[int, int] = (32, 64),
                 image_size: int = 28) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        # Adaptive pooling to a fixed 7x7 grid lets the same net take 28x28 (MNIST) and 32x32 (CIFAR) inputs.
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Linear(channels * 7 * 7, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("cnn")
def cnn(num_classes: int, in_channels: int, **options) -> nn.Module:
    return SmallCNN(num_classes, in_channels, batch_norm=False, **options)


@register_model("cnn_bn")
def cnn_bn(num_classes: int, in_channels: int, **options) -> nn.Module:
    return SmallCNN(num_classes, in_channels, batch_norm=True, **options)
