"""Wide ResNets (Zagoruyko & Komodakis 2016) as RepDistiller and mdistiller build them.

WRN-d-k: a 3x3 stem with 16 channels, three stages of (d-4)/6 pre-activation
blocks with 16k, 32k and 64k channels, a final BN+ReLU, global average pooling
and one linear layer. Dropout inside the blocks is left out: RepDistiller
(HobbitLong/RepDistiller, models/wrn.py) trains with a drop rate of 0.

Module names follow RepDistiller's (`block1.layer.0.convShortcut`, ...), so
their state_dict keys are the same and their teacher checkpoints load.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; a 1x1 projection shortcut where the width changes."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        # In place is safe: both ReLUs act on fresh BN outputs, never on the
        # block input that the identity shortcut adds back.
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.equal_in_out = in_channels == channels
        # Like RepDistiller, the projection is keyed on width alone: every
        # stride-2 block of a WRN also changes the width.
        self.convShortcut = (  # camelCase: RepDistiller's checkpoint key
            None if self.equal_in_out
            else nn.Conv2d(in_channels, channels, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        # A projecting block's shortcut starts from the activated input, an
        # identity block's from the raw input (as in the reference code).
        shortcut = x if self.equal_in_out else self.convShortcut(act)
        return shortcut + out


def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [WideBasicBlock(in_channels, channels, stride)]
    layers += [WideBasicBlock(channels, channels, 1) for _ in range(blocks - 1)]
    # The extra `layer` level reproduces RepDistiller's NetworkBlock keys.
    return nn.Sequential(OrderedDict(layer=nn.Sequential(*layers)))


class WideResNet(nn.Module):
    """WRN-`depth`-`widen`, designed for 32x32 images; subclasses set both.

    `features(x)` is the last stage's output after the final BN+ReLU,
    (N, 64*widen, 8, 8) for a 32x32 input; `classify` pools and applies `fc`.
    The pooling is global and every convolution padded, so any image size
    runs (`image_size` changes no layer).
    """

    depth: int
    widen: int
    min_image_size = 1

    def __init__(self, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        if (self.depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, not {self.depth}")
        n = (self.depth - 4) // 6
        widths = [16, 16 * self.widen, 32 * self.widen, 64 * self.widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = _stage(widths[0], widths[1], n, stride=1)
        self.block2 = _stage(widths[1], widths[2], n, stride=2)
        self.block3 = _stage(widths[2], widths[3], n, stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            # normal(0, sqrt(2 / (k*k*out))) in the reference is Kaiming fan-out.
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(features), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class WRN16x1(WideResNet):
    """WRN-16-1: two blocks per stage, widths 16/32/64."""

    depth, widen = 16, 1


class WRN16x2(WideResNet):
    """WRN-16-2: two blocks per stage, widths 32/64/128; a common student."""

    depth, widen = 16, 2


class WRN40x1(WideResNet):
    """WRN-40-1: six blocks per stage, widths 16/32/64; a common student."""

    depth, widen = 40, 1


class WRN40x2(WideResNet):
    """WRN-40-2: six blocks per stage, widths 32/64/128; a common teacher."""

    depth, widen = 40, 2
