"""ResNet: torchvision's v1.5 (stride on the 3x3 conv; paper App. B.2) with a small-image stem option."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._common import register

__all__ = ["ResNetConfig", "BasicBlock", "Bottleneck", "ResNet"]


@dataclass
class ResNetConfig:
    block: str = "bottleneck"  # basic | bottleneck
    layers: str = "3,4,6,3"  # blocks per stage
    width: int = 64  # channels of the first stage
    num_classes: int = 1000
    channels: int = 3
    stem: str = "imagenet"  # imagenet: 7x7/2 conv + max-pool; small: 3x3/1 conv (8x8 .. 32x32 images)
    image_size: int = 224


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """x: (b, channels, h, w) -> logits (b, num_classes)."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.config = cfg
        block = {"basic": BasicBlock, "bottleneck": Bottleneck}[cfg.block]
        layers = [int(n) for n in cfg.layers.split(",")]
        if cfg.stem == "imagenet":
            self.conv1 = nn.Conv2d(cfg.channels, cfg.width, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(cfg.channels, cfg.width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(cfg.width)
        self.inplanes = cfg.width
        stages = []
        for i, n in enumerate(layers):
            stages.append(self._make_layer(block, cfg.width * 2**i, n, stride=1 if i == 0 else 2))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(self.inplanes, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        out = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        out += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


register(
    ResNetConfig,
    ResNet,
    kind="image",
    order=2,
    presets={
        "resnet50": ResNetConfig(),
        "resnet18": ResNetConfig(block="basic", layers="2,2,2,2"),
        "resnet-tiny": ResNetConfig(
            block="basic", layers="1,1,1", width=16, num_classes=10, stem="small", image_size=8
        ),
    },
    patterns=(
        (r"(^|\.)(conv\d+|downsample\.0)\.", ("conv",)),
        (r"(^|\.)(bn\d+|downsample\.1)\.", ("norm",)),
        (r"(^|\.)fc\.", ("head",)),
    ),
)
