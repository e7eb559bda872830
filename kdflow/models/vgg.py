"""CIFAR VGGs with BatchNorm as RepDistiller and mdistiller build them.

Five blocks of 3x3 conv+BN+ReLU (biased convolutions, as in the reference),
max-pooled after each of the first three, so the last two run on 4x4 maps for
a 32x32 input; then global average pooling and a single linear layer (the
fully connected head of ImageNet VGG is removed). RepDistiller
(HobbitLong/RepDistiller, models/vgg.py) maps "vgg8" to `vgg8_bn` (cfg 'S')
and "vgg13" to `vgg13_bn` (cfg 'B'); these are those networks.

Module names follow RepDistiller's (`block0.0.weight`, ...), so their
state_dict keys are the same and their teacher checkpoints load.
"""

from __future__ import annotations

import torch
from torch import nn

# Output channels of each conv in each of the five blocks.
CFG_S = ((64,), (128,), (256,), (512,), (512,))
CFG_B = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))


def _block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        # The reference drops each block's last ReLU to expose pre-activation
        # maps and applies it in forward; keeping it here is the same function
        # and, having no parameters, leaves the state_dict keys unchanged.
        layers += [nn.Conv2d(in_channels, width, 3, padding=1),
                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """VGG with BatchNorm, designed for 32x32 images; subclasses set `cfg`.

    `features(x)` is the last block's output before the final pooling,
    (N, 512, 4, 4) for a 32x32 input; `classify` pools and applies the
    linear `classifier`. The final pooling is global, so any image size from
    8x8 on runs (`image_size` changes no layer).
    """

    cfg: tuple[tuple[int, ...], ...]
    min_image_size = 8  # three 2x2 max-pools need at least one pixel left

    def __init__(self, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        ins = [3] + [widths[-1] for widths in self.cfg[:-1]]
        self.block0 = _block(ins[0], self.cfg[0])
        self.block1 = _block(ins[1], self.cfg[1])
        self.block2 = _block(ins[2], self.cfg[2])
        self.block3 = _block(ins[3], self.cfg[3])
        self.block4 = _block(ins[4], self.cfg[4])
        # The reference pools after block3 too, but only for 64x64 inputs.
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.cfg[4][-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # Small logits at the start, as in the reference.
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block0(x))
        x = self.pool(self.block1(x))
        x = self.pool(self.block2(x))
        return self.block4(self.block3(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(features), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class VGG8(CifarVGG):
    """VGG-8 (RepDistiller cfg 'S'): one conv per block; a common student."""

    cfg = CFG_S


class VGG13(CifarVGG):
    """VGG-13 (RepDistiller cfg 'B'): two convs per block; a common teacher."""

    cfg = CFG_B
