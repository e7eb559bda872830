"""torchvision's architectures as zoo entries: built offline, split into features
and classify, and trained by logit and feature methods alike."""

import pytest
import torch
import torchvision
from torch import nn

from kdflow.distill import methods
from kdflow.study.planner import plan
from kdflow.models.torchvision_zoo import TorchvisionNet
from kdflow.models.zoo import MODELS, build_model, count_parameters, state_module
from kdflow.train.engine import TrainConfig, fit
from kdflow.train.job import teacher_signal
from kdflow.workflow.config import validate

TORCHVISION = sorted(name for name, cls in MODELS.items() if issubclass(cls, TorchvisionNet))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Batches of 2 gain nothing from intra-op threads on shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_zoo_has_the_torchvision_architectures_under_their_names():
    assert set(TORCHVISION) >= {"resnet18", "resnet34", "mobilenet_v2", "mobilenet_v3_small",
                                "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0"}
    for name in TORCHVISION:
        assert MODELS[name].arch == name and name in torchvision.models.list_models()


@pytest.mark.parametrize("name", TORCHVISION)
def test_an_entry_is_torchvisions_network_with_its_published_size(name):
    # The weights' metadata (read offline, nothing downloaded) gives the
    # 1000-class network's parameter count and smallest input.
    meta = torchvision.models.get_model_weights(name).DEFAULT.meta
    torch.manual_seed(0)
    model = build_model(name, 1000)
    assert type(state_module(model)) is type(torchvision.models.get_model(name, weights=None))
    assert count_parameters(model) == meta["num_params"]
    assert meta["min_size"] == (MODELS[name].min_image_size,) * 2
    # Randomly initialised, never pretrained: another seed, other weights.
    torch.manual_seed(1)
    other = build_model(name, 1000)
    first = next(iter(model.state_dict()))
    assert not torch.equal(model.state_dict()[first], other.state_dict()[first])


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", TORCHVISION)
def test_features_then_classify_is_torchvisions_forward(name, size):
    torch.manual_seed(0)
    model = build_model(name, 10, size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)  # torchvision's own forward
        fmap = model.features(x)
    assert logits.shape == (2, 10)
    first_linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert fmap.shape[:2] == (2, first_linear.in_features)
    assert fmap.shape[2:] == (size // 32, size // 32)
    assert torch.allclose(model.classify(fmap), logits, atol=1e-6)


def test_a_plain_torchvision_state_dict_matches_the_wrapped_network():
    model = build_model("resnet18", 10)
    plain = torchvision.models.resnet18(num_classes=10).state_dict()
    assert state_module(model).state_dict().keys() == plain.keys()
    state_module(model).load_state_dict(plain)
    assert torch.equal(model.net.fc.weight, plain["fc.weight"])
    # kdflow's own nets are their own state module (RepDistiller's keys).
    own = build_model("resnet8", 10)
    assert state_module(own) is own


SETTINGS = {a.method: a for a in plan(validate({"kd": {"method": ["kd", "hint", "cosine"]}}))
            if a.role == "student_kd"}


# Every entry with a logit method and a feature method; cosine, the other
# feature method, on the cheapest entry only (the suite's time is a budget).
@pytest.mark.parametrize("name,method", [(n, m) for n in TORCHVISION for m in ("kd", "hint")]
                         + [("mobilenet_v3_small", "cosine")])
def test_a_torchvision_student_trains_a_step_with_logit_and_feature_methods(name, method):
    # 64x64: at 32x32 these nets end on 1x1 maps (tests/test_models.py).
    size = 64
    torch.manual_seed(0)
    student, teacher = build_model(name, 10, size), build_model("lightnn", 10, size).eval()
    before = {k: p.detach().clone() for k, p in student.named_parameters()}
    arm = SETTINGS[method]
    built = methods.build(method, arm.values, methods.BuildContext(
        student, teacher, "cpu", torch.Generator().manual_seed(0), (3, size, size)))
    assert built.features == (method != "kd")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 3])
    cfg = validate({"student": {"model": name, "epochs": 1, "batch_size": 2}})
    result = fit(student, x, y, x[:2], y[:2], TrainConfig.from_config(cfg["student"], cfg["engine"]),
                 seed=0, loss_fn=built.loss,
                 teacher=teacher_signal(teacher, features=built.features, cached=None),
                 features=built.features, extra=built.extra)
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    # Every weight of the student learnt, the feature layers as well as the head.
    assert [k for k in before if torch.equal(result.best_state[k], before[k])] == []


# ---------------------------------------------------------------------------
# Any architecture of torchvision's classification list, by its name
# ---------------------------------------------------------------------------

from kdflow import KdflowError  # noqa: E402
from kdflow.models.torchvision_zoo import classification_names, torchvision_class  # noqa: E402
from kdflow.models.zoo import has_features, model_class, model_name  # noqa: E402

# One of each family kdflow splits into features and classify, and the
# families it trains with logit methods only, each at the smallest size its
# weights were published for (at least 32).
FAMILY_SAMPLES = ["resnet50", "resnext50_32x4d", "efficientnet_v2_s", "regnet_y_400mf",
                  "convnext_tiny", "vgg11", "alexnet", "densenet121", "mnasnet0_5"]
LOGITS_ONLY = ["squeezenet1_0", "googlenet", "inception_v3", "swin_t", "vit_b_16", "maxvit_t"]


def test_every_name_of_torchvisions_classification_list_has_a_zoo_class():
    names = torchvision.models.list_models(module=torchvision.models)
    assert len(names) >= 80 and set(classification_names()) == set(names)
    # vgg13 is RepDistiller's CIFAR VGG-13 in kdflow's own table, which is
    # read first; every other name is torchvision's network.
    assert [n for n in names if not issubclass(model_class(n), TorchvisionNet)] == ["vgg13"]
    for name in set(names) - {"vgg13"}:
        cls = model_class(name)
        assert cls.arch == name and cls.min_image_size >= 1
    assert torchvision_class("vit_b_16").min_image_size == 224
    assert not has_features("vit_b_16") and has_features("resnet50") and has_features("deepnn")


@pytest.mark.parametrize("name", FAMILY_SAMPLES + LOGITS_ONLY)
def test_any_torchvision_name_builds_with_its_head_sized_for_the_classes(name):
    size = max(32, model_class(name).min_image_size)
    model = build_model(name, 7, image_size=size).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (1, 7)
        if name in FAMILY_SAMPLES:
            assert torch.allclose(model.classify(model.features(x)), logits, atol=1e-5)
    assert model_name(model) == name and has_features(name) == (name in FAMILY_SAMPLES)


def test_a_name_neither_table_has_and_a_feature_method_on_a_transformer_are_config_errors():
    with pytest.raises(KdflowError, match=r"student.model: 'resnet9' is not one of kdflow's "
                                          r"models.*torchvision's classification models"):
        validate({"student": {"model": ["lightnn", "resnet9"]}})
    with pytest.raises(KdflowError, match=r"kd.method: hint distil feature maps.*vit_b_16's "
                                          r"\(student.model\).*use a logit method"):
        validate({"student": {"model": "vit_b_16"}, "kd": {"method": ["kd", "hint"]},
                  "data": {"image_size": 224}})
    # Logit methods take it.
    assert validate({"student": {"model": "vit_b_16"}, "kd": {"method": ["kd", "dist"]}}) \
        ["student"]["model"] == "vit_b_16"
