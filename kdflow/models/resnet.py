"""CIFAR ResNets (He et al. 2016, Sec. 4.2) as RepDistiller and mdistiller build them.

Three stages of 3x3 basic blocks on 32x32, 16x16 and 8x8 maps, then global
average pooling and one linear layer. Following RepDistiller
(HobbitLong/RepDistiller, models/resnet.py), a shortcut that changes shape is a
1x1 convolution + BN (He et al.'s option B) rather than the parameter-free
zero-padding (option A) He et al. used on CIFAR, so these networks have a few
thousand parameters more than He et al.'s Table 6 counts; the "x4" variants
widen every stage, which makes even the first stage need a projection.

Module names follow RepDistiller's, so their state_dict keys are the same and
their published teacher checkpoints load with `load_state_dict`.
"""

from __future__ import annotations

import torch
from torch import nn

# Channels of the stem and of the three stages.
NARROW = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity or 1x1-projection shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        # In place is safe: each ReLU acts on a fresh BN output or sum that no
        # backward pass needs to read again.
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2), designed for 32x32 images; subclasses set `depth` and `widths`.

    `features(x)` is the output of the last stage, (N, widths[3], 8, 8) for a
    32x32 input; `classify` average-pools it and applies the linear layer.
    The pooling is global and every convolution padded, so any image size
    runs (`image_size` changes no layer).
    """

    depth: int
    widths: tuple[int, int, int, int]
    min_image_size = 1

    def __init__(self, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        if (self.depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, not {self.depth}")
        n = (self.depth - 2) // 6
        stem, w1, w2, w3 = self.widths
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(stem, w1, n, stride=1)
        self.layer2 = self._stage(w1, w2, n, stride=2)
        self.layer3 = self._stage(w2, w3, n, stride=2)
        # Adaptive pooling equals RepDistiller's AvgPool2d(8) on 32x32 inputs.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, channels, stride)]
        layers += [BasicBlock(channels, channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(features), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class ResNet8(CifarResNet):
    """ResNet-8: one block per stage; RepDistiller's smallest student."""

    depth, widths = 8, NARROW


class ResNet14(CifarResNet):
    """ResNet-14: two blocks per stage."""

    depth, widths = 14, NARROW


class ResNet20(CifarResNet):
    """ResNet-20: three blocks per stage; a common CIFAR student."""

    depth, widths = 20, NARROW


class ResNet32(CifarResNet):
    """ResNet-32: five blocks per stage."""

    depth, widths = 32, NARROW


class ResNet44(CifarResNet):
    """ResNet-44: seven blocks per stage."""

    depth, widths = 44, NARROW


class ResNet56(CifarResNet):
    """ResNet-56: nine blocks per stage; a common CIFAR teacher."""

    depth, widths = 56, NARROW


class ResNet110(CifarResNet):
    """ResNet-110: eighteen blocks per stage; a common CIFAR teacher."""

    depth, widths = 110, NARROW


class ResNet8x4(CifarResNet):
    """ResNet-8x4: ResNet-8 with four times the channels (stem 32)."""

    depth, widths = 8, WIDE


class ResNet32x4(CifarResNet):
    """ResNet-32x4: ResNet-32 with four times the channels (stem 32)."""

    depth, widths = 32, WIDE
