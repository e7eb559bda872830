"""torchvision's ImageNet architectures as kdflow models, split into features and classify.

Any name of torchvision's classification list
(`torchvision.models.list_models(module=torchvision.models)`) builds: the
entry wraps `torchvision.models.get_model(name, weights=None,
num_classes=...)` as its attribute `net` (the builder never downloads:
weights come only through a config's init, fetched and verified by kdflow,
kdflow.models.pretrained and kdflow.models.weights), so the head is sized
for the dataset's classes by torchvision's own builder. For the families in
FAMILIES kdflow also knows where torchvision's forward pass ends its last
feature map (`features` / `classify`, which feature-based distillation
needs); `forward` is torchvision's, so `classify(features(x))` can be checked
against it. The other families (vision transformers, Swin, MaxViT,
GoogLeNet, Inception, SqueezeNet) train with the logit methods only.

These networks downsample 32 times (a stride-2 stem, a max-pool or another
stride-2 stage, then three more): a 32x32 image leaves a 1x1 map, a 224x224
one a 7x7 map. They suit datasets at their own resolution
(`data.image_size`) more than 32x32 CIFAR.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class TorchvisionNet(nn.Module):
    """A torchvision network held as `net`; subclasses set `arch` (torchvision's name)."""

    arch: str
    # torchvision's weights metadata gives min_size (1, 1) for the named
    # entries below: all their poolings are padded
    # (tests/test_torchvision_zoo.py checks); `torchvision_class` reads it
    # for every other architecture.
    min_image_size = 1
    has_features = False

    def __init__(self, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        # Deferred: importing torchvision.models costs ~2 s, which every job
        # that imports the zoo would pay even for kdflow's own nets.
        import torchvision.models

        self.net = torchvision.models.get_model(
            self.arch, weights=None, num_classes=num_classes,
            **_size_arguments(self.arch, image_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TorchvisionResNet(TorchvisionNet):
    """ResNets: features end after layer4; classify is avgpool, flatten, fc."""

    has_features = True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.fc(torch.flatten(self.net.avgpool(features), 1))


class TorchvisionMobileNet(TorchvisionNet):
    """MobileNets and EfficientNets: features are `net.features`; classify
    is global average pooling, flatten, `net.classifier`."""

    has_features = True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        # MobileNetV2 has no avgpool module and calls this function; the
        # others' AdaptiveAvgPool2d(1) calls it too: the same numbers for all.
        return self.net.classifier(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))


class TorchvisionShuffleNet(TorchvisionNet):
    """ShuffleNetV2: features end after conv5; classify is the mean over
    height and width, then fc (as torchvision's forward)."""

    has_features = True

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


class TorchvisionRegNet(TorchvisionNet):
    """RegNets: features end after the trunk; classify is avgpool, flatten, fc."""

    has_features = True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.trunk_output(self.net.stem(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.fc(torch.flatten(self.net.avgpool(features), 1))


class TorchvisionPooledClassifier(TorchvisionNet):
    """ConvNeXt, VGG and AlexNet: features are `net.features`; classify is
    `net.avgpool`, then `net.classifier` (ConvNeXt's flattens inside it)."""

    has_features = True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.net.avgpool(features)
        if not self.arch.startswith("convnext"):
            pooled = torch.flatten(pooled, 1)
        return self.net.classifier(pooled)


class TorchvisionDenseNet(TorchvisionNet):
    """DenseNets: features are `net.features` after its final ReLU; classify
    is global average pooling, flatten, `net.classifier`."""

    has_features = True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net.features(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))


class TorchvisionMNASNet(TorchvisionNet):
    """MNASNets: features are `net.layers`; classify is the spatial mean, then `net.classifier`."""

    has_features = True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.layers(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(features.mean([2, 3]))


# Where each family's last feature map is, by torchvision's name prefix; a
# family missing here builds and trains, without `features`.
FAMILIES: tuple[tuple[tuple[str, ...], type[TorchvisionNet]], ...] = (
    (("resnet", "resnext", "wide_resnet"), TorchvisionResNet),
    (("mobilenet", "efficientnet"), TorchvisionMobileNet),
    (("shufflenet",), TorchvisionShuffleNet),
    (("regnet",), TorchvisionRegNet),
    (("convnext", "vgg", "alexnet"), TorchvisionPooledClassifier),
    (("densenet",), TorchvisionDenseNet),
    (("mnasnet",), TorchvisionMNASNet),
)


def _size_arguments(arch: str, image_size: int) -> dict:
    """Builder arguments that depend on the image size or the training mode:
    ViTs size their position embedding for the image, MaxViT its attention
    grid; GoogLeNet and Inception return auxiliary logits in training mode
    unless told not to (a kdflow model returns one tensor of logits)."""
    if arch.startswith("vit_"):
        return {"image_size": image_size}
    if arch.startswith("maxvit"):
        return {"input_size": (image_size, image_size)}
    if arch in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True}
    return {}


@functools.lru_cache(maxsize=None)
def classification_names() -> tuple[str, ...]:
    """torchvision's classification architectures, as its registry lists them."""
    import torchvision.models

    return tuple(torchvision.models.list_models(module=torchvision.models))


@functools.lru_cache(maxsize=None)
def torchvision_class(arch: str) -> type[TorchvisionNet]:
    """A kdflow model class for torchvision's architecture `arch` (one class
    per name, so a model says which name it was built under)."""
    import torchvision.models

    if arch not in classification_names():
        raise KeyError(arch)
    base = next((cls for prefixes, cls in FAMILIES if arch.startswith(prefixes)), TorchvisionNet)
    # The smallest input torchvision's weights were checked at (their meta's
    # min_size); architectures without published weights take any size.
    weights = list(torchvision.models.get_model_weights(arch))
    low = weights[0].meta.get("min_size", (1, 1))[0] if weights else 1
    return type(f"Torchvision_{arch}", (base,), {
        "arch": arch, "min_image_size": int(low),
        "__doc__": f"torchvision's {arch}.", "__module__": __name__})
