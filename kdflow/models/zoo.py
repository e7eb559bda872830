"""Every architecture by name (build_model), and the tutorial's DeepNN and LightNN.

DeepNN and LightNN are the networks of PyTorch's knowledge-distillation tutorial.
Every model is built for square 3-channel images of one size (`image_size`,
the dataset's): the flattened-map classifiers of DeepNN and LightNN are sized
by it, the other nets pool globally and take any size from their minimum on.

ReLUs are in place: the same function, but the teacher's largest activations
(64 MiB per batch of 128 after its first convolution) are not allocated
twice, which saves memory and page-fault time on the CPU.

Each model splits into `features(x)` (the last convolutional feature map) and
`classify(features)`, so feature-based distillation methods can use the map
directly instead of hooking into module paths by name.
"""

from __future__ import annotations

from numbers import Integral

import torch
from torch import nn

from kdflow import KdflowError
from kdflow.models import torchvision_zoo as tv
from kdflow.models.resnet import (ResNet8, ResNet8x4, ResNet14, ResNet20, ResNet32,
                           ResNet32x4, ResNet44, ResNet56, ResNet110)
from kdflow.models.vgg import VGG8, VGG13
from kdflow.models.wrn import WRN16x1, WRN16x2, WRN40x1, WRN40x2


class _FeaturesThenClassifier(nn.Module):
    """`features` (a conv stack ending in two 2x2 max-pools) then `classifier`
    (an MLP on the flattened map, whose first layer takes
    (image_size // 4)^2 * `feature_channels` inputs)."""

    features: nn.Module
    classifier: nn.Module
    feature_channels: int
    min_image_size = 4  # the second pooling needs a 2x2 map

    @classmethod
    def flat_features(cls, image_size: int) -> int:
        """Inputs of the first classifier layer for `image_size` images."""
        return (image_size // 4) ** 2 * cls.feature_channels

    @classmethod
    def image_size_for(cls, flat_features: int) -> int | None:
        """The smallest image size whose flattened map has `flat_features`
        values (sizes up to 3 pixels larger floor to the same map), or None."""
        side = round((flat_features / cls.feature_channels) ** 0.5)
        return 4 * side if side > 0 and cls.flat_features(4 * side) == flat_features else None

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class DeepNN(_FeaturesThenClassifier):
    """Teacher: four 3x3 convolutions in two pooled stages, then a 2-layer MLP.

    At 32x32, 1,186,986 parameters for 10 classes; ~94 M multiply-accumulates
    per image.
    """

    feature_channels = 32

    def __init__(self, num_classes: int = 10, image_size: int = 32):
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
            nn.Linear(self.flat_features(image_size), 512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(512, num_classes),
        )


class LightNN(_FeaturesThenClassifier):
    """Student: two 3x3 convolutions with 16 channels, then a 2-layer MLP.

    At 32x32, 267,738 parameters for 10 classes (a quarter of the teacher's)
    and ~1.3 M multiply-accumulates per image (1/70 of the teacher's compute).
    """

    feature_channels = 16

    def __init__(self, num_classes: int = 10, image_size: int = 32):
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
            nn.Linear(self.flat_features(image_size), 256),
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
    # torchvision's ImageNet architectures (never with downloaded weights),
    # under torchvision's names.
    "resnet18": tv.ResNet18,
    "resnet34": tv.ResNet34,
    "mobilenet_v2": tv.MobileNetV2,
    "mobilenet_v3_small": tv.MobileNetV3Small,
    "mobilenet_v3_large": tv.MobileNetV3Large,
    "efficientnet_b0": tv.EfficientNetB0,
    "shufflenet_v2_x1_0": tv.ShuffleNetV2x1_0,
}


def model_class(name: str) -> type[nn.Module]:
    """The class of model `name`: kdflow's own table first, then any of
    torchvision's classification architectures by its name."""
    if name in MODELS:
        return MODELS[name]
    try:
        return tv.torchvision_class(name)
    except KeyError:
        raise KdflowError(unknown_model(name)) from None


def unknown_model(name) -> str:
    return (f"unknown model {name!r}: choose one of kdflow's {sorted(MODELS)} or any name of "
            "torchvision's classification models (torchvision.models.list_models(), e.g. "
            "resnet50, convnext_tiny, efficientnet_b3, vit_b_16)")


def is_model(name) -> bool:
    return isinstance(name, str) and (name in MODELS or name in tv.classification_names())


def has_features(name: str) -> bool:
    """Whether kdflow knows where model `name`'s last feature map is (the
    feature-based methods need it): every net of its own, and torchvision's
    families in kdflow.models.torchvision_zoo.FAMILIES."""
    return getattr(model_class(name), "has_features", True)


def build_model(name: str, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """Model `name` for `num_classes` classes and image_size x image_size RGB images."""
    cls = model_class(name)
    minimum = cls.min_image_size
    # Integral: sizes read from array shapes may be NumPy integers.
    if isinstance(image_size, bool) or not isinstance(image_size, Integral) \
            or image_size < minimum:
        raise KdflowError(
            f"model {name} cannot take {image_size!r}x{image_size!r} images: it needs at least "
            f"{minimum}x{minimum} pixels; set data.image_size to {minimum} or more, or choose "
            "another model")
    return cls(num_classes=num_classes, image_size=int(image_size))


def model_name(model: nn.Module) -> str:
    """The zoo name `model` was built under (each name has a class of its own)."""
    for name, cls in MODELS.items():
        if type(model) is cls:
            return name
    if isinstance(model, tv.TorchvisionNet):
        return model.arch
    raise ValueError(f"{type(model).__name__} is no model of the zoo")


def state_module(model: nn.Module) -> nn.Module:
    """The module whose state_dict a plain weights file matches: the wrapped
    torchvision network for torchvision entries (a file saved from
    `torchvision.models.resnet18().state_dict()`), the model itself for
    kdflow's own nets (whose keys are RepDistiller's)."""
    return model.net if isinstance(model, tv.TorchvisionNet) else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes the weights take in memory (and, to within a header, on disk)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
