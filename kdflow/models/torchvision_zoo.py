"""torchvision's ImageNet architectures as kdflow models, split into features and classify.

Each entry wraps `torchvision.models.<arch>(weights=None, num_classes=...)`
as its attribute `net` (no download, ever: weights come only from files the
user names, kdflow.models.weights) and says, per family, where torchvision's
own forward pass ends its last feature map. `forward` is torchvision's, so
`classify(features(x))` can be checked against it.

These networks downsample 32 times (a stride-2 stem, a max-pool or another
stride-2 stage, then three more): a 32x32 image leaves a 1x1 map, a 224x224
one a 7x7 map. They suit datasets at their own resolution
(`data.image_size`) more than 32x32 CIFAR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TorchvisionNet(nn.Module):
    """A torchvision network held as `net`; subclasses set `arch` (torchvision's name)."""

    arch: str
    # torchvision's weights metadata gives min_size (1, 1) for every entry
    # here: all their poolings are padded (tests/test_torchvision_zoo.py checks).
    min_image_size = 1

    def __init__(self, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        # Deferred: importing torchvision.models costs ~2 s, which every job
        # that imports the zoo would pay even for kdflow's own nets.
        import torchvision.models

        # Every layer is sized by the channels alone: image_size changes nothing here.
        self.net = getattr(torchvision.models, self.arch)(weights=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TorchvisionResNet(TorchvisionNet):
    """ResNets: features end after layer4; classify is avgpool, flatten, fc."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.fc(torch.flatten(self.net.avgpool(features), 1))


class TorchvisionMobileNet(TorchvisionNet):
    """MobileNets and EfficientNets: features are `net.features`; classify
    is global average pooling, flatten, `net.classifier`."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        # MobileNetV2 has no avgpool module and calls this function; the
        # others' AdaptiveAvgPool2d(1) calls it too: the same numbers for all.
        return self.net.classifier(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))


class TorchvisionShuffleNet(TorchvisionNet):
    """ShuffleNetV2: features end after conv5; classify is the mean over
    height and width, then fc (as torchvision's forward)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.conv1(x))
        return n.conv5(n.stage4(n.stage3(n.stage2(x))))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.fc(features.mean([2, 3]))


class ResNet18(TorchvisionResNet):
    """torchvision's resnet18 (He et al. 2016, ImageNet layout)."""

    arch = "resnet18"


class ResNet34(TorchvisionResNet):
    """torchvision's resnet34 (He et al. 2016, ImageNet layout)."""

    arch = "resnet34"


class MobileNetV2(TorchvisionMobileNet):
    """torchvision's mobilenet_v2 (Sandler et al. 2018)."""

    arch = "mobilenet_v2"


class MobileNetV3Small(TorchvisionMobileNet):
    """torchvision's mobilenet_v3_small (Howard et al. 2019); its map ends in Hardswish."""

    arch = "mobilenet_v3_small"


class MobileNetV3Large(TorchvisionMobileNet):
    """torchvision's mobilenet_v3_large (Howard et al. 2019); its map ends in Hardswish."""

    arch = "mobilenet_v3_large"


class EfficientNetB0(TorchvisionMobileNet):
    """torchvision's efficientnet_b0 (Tan & Le 2019); its map ends in SiLU."""

    arch = "efficientnet_b0"


class ShuffleNetV2x1_0(TorchvisionShuffleNet):
    """torchvision's shufflenet_v2_x1_0 (Ma et al. 2018)."""

    arch = "shufflenet_v2_x1_0"
