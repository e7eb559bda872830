"""Every architecture by name (build_model), and the tutorial's DeepNN and LightNN.

DeepNN and LightNN are the networks of PyTorch's knowledge-distillation tutorial.

ReLUs are in place: the same function, but the teacher's largest activations
(64 MiB per batch of 128 after its first convolution) are not allocated
twice, which saves memory and page-fault time on the CPU.

Each model splits into `features(x)` (the last convolutional feature map) and
`classify(features)`, so feature-based distillation methods can use the map
directly instead of hooking into module paths by name.
"""

from __future__ import annotations

import torch
from torch import nn

from kdflow import KdflowError
from kdflow.models.resnet import (ResNet8, ResNet8x4, ResNet14, ResNet20, ResNet32,
                           ResNet32x4, ResNet44, ResNet56, ResNet110)
from kdflow.models.vgg import VGG8, VGG13
from kdflow.models.wrn import WRN16x1, WRN16x2, WRN40x1, WRN40x2


class _FeaturesThenClassifier(nn.Module):
    """`features` (a conv stack) then `classifier` (an MLP on the flattened map)."""

    features: nn.Module
    classifier: nn.Module

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class DeepNN(_FeaturesThenClassifier):
    """Teacher: four 3x3 convolutions in two pooled stages, then a 2-layer MLP.

    1,186,986 parameters for 10 classes; ~94 M multiply-accumulates per image.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 128, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(64, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(2048, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(512, num_classes),
        )


class LightNN(_FeaturesThenClassifier):
    """Student: two 3x3 convolutions with 16 channels, then a 2-layer MLP.

    267,738 parameters for 10 classes (a quarter of the teacher's) and ~1.3 M
    multiply-accumulates per image (1/70 of the teacher's compute).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(16, 16, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(1024, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(256, num_classes),
        )


# A plain dict, not a registry with decorators: the schema's `enum` of model
# names is checked against these keys by a test.
MODELS: dict[str, type[nn.Module]] = {
    "deepnn": DeepNN,
    "lightnn": LightNN,
    # The CIFAR zoo of RepDistiller / mdistiller, under their names.
    "resnet8": ResNet8,
    "resnet14": ResNet14,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet44": ResNet44,
    "resnet56": ResNet56,
    "resnet110": ResNet110,
    "resnet8x4": ResNet8x4,
    "resnet32x4": ResNet32x4,
    "wrn_16_1": WRN16x1,
    "wrn_16_2": WRN16x2,
    "wrn_40_1": WRN40x1,
    "wrn_40_2": WRN40x2,
    "vgg8": VGG8,
    "vgg13": VGG13,
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    try:
        cls = MODELS[name]
    except KeyError:
        raise KdflowError(
            f"unknown model {name!r}; choose one of {sorted(MODELS)}"
        ) from None
    return cls(num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes the weights take in memory (and, to within a header, on disk)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
