"""CIFAR ResNets of He et al. 2016 (section 4.2): 6n+2 layers, widths 16/32/64, option-A identity shortcuts.

Option A (zero-padded, strided identity) keeps resnet20 at 0.27M parameters as in the paper; option B adds
1x1 conv shortcuts and is available for those who want quantizable downsample layers.

`block="binary"` builds the block order of binary networks (XNOR-Net section 3.2, Fig. 3; seed 002's resnet20_q):
BN -> (binarize) -> conv -> ReLU. Every conv then reads a BatchNorm output, which is signed and centred, so
sign() sees both signs. In the standard block each conv reads a ReLU output (>= 0): sign() maps all of it to +1,
the conv output is then nearly constant over the batch, and the BatchNorm after it divides by that tiny spread,
which is what made W1A1 gradients explode (max |grad| ~1e7-1e8 at the first step).
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from qrun.errors import QrunError
from qrun.models.registry import register_model


class PadShortcut(nn.Module):
    """Option A: subsample spatially and zero-pad the new channels; no parameters."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.downsample = PadShortcut(planes - in_planes)
            else:
                self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                                nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class BinaryBlock(nn.Module):
    """BN -> conv -> ReLU twice, the ReLU of the second after the residual sum: each conv's input is a BN output."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.downsample = PadShortcut(planes - in_planes)
            else:  # the 1x1 conv reads a BN output too
                self.downsample = nn.Sequential(nn.BatchNorm2d(in_planes),
                                                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        out = self.relu(self.conv1(self.bn1(x)))
        out = self.conv2(self.bn2(out))
        return self.relu(out + self.downsample(x))


BLOCKS = {"basic": BasicBlock, "binary": BinaryBlock}


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int, shortcut: str = "A",
                 block: str = "basic") -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in ("A", "B"):
            raise QrunError(f"model.options.shortcut={shortcut} is unknown; accepted: A, B")
        if block not in BLOCKS:
            raise QrunError(f"model.options.block={block} is unknown; accepted: {', '.join(BLOCKS)}")
        blocks, block_class = (depth - 2) // 6, BLOCKS[block]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages = []
        for index, planes in enumerate((16, 32, 64)):
            stage = []
            for position in range(blocks):
                stride = 2 if index > 0 and position == 0 else 1
                stage.append(block_class(in_planes, planes, stride, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def _register(depth: int) -> None:
    @register_model(f"resnet{depth}")
    def build(num_classes: int, in_channels: int, **options) -> nn.Module:
        return CifarResNet(depth, num_classes, in_channels, **options)


for _depth in (20, 32, 44, 56):
    _register(_depth)
