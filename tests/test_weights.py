"""Weights from outside: teachers and starting points read from files, each misfit one clear line."""

import os

import pytest
import torch
import torchvision
from torch import nn

from kdflow import KdflowError
from kdflow.models import checkpoint
from kdflow.models.weights import _head, init_from, load_teacher, read_state
from kdflow.models.zoo import MODELS, build_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_line_error(match, fn, *args, **kwargs) -> str:
    with pytest.raises(KdflowError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def save_kdflow(path, model, name, num_classes, image_size, drop_size=False):
    checkpoint.save(path, state_dict=model.state_dict(), model=name, num_classes=num_classes,
                    image_size=image_size)
    if drop_size:  # as an older kdflow wrote it
        ckpt = torch.load(path, weights_only=True)
        del ckpt["image_size"]
        torch.save(ckpt, path)
    return path


def same_outputs(a, b, size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


# --- Round trips --------------------------------------------------------------

def test_a_kdflow_checkpoint_loads_as_its_teacher(tmp_path):
    torch.manual_seed(0)
    original = build_model("lightnn", 5, 64)
    path = save_kdflow(tmp_path / "t.pt", original, "lightnn", 5, 64)
    teacher, info = load_teacher(path, model="lightnn", num_classes=5, image_size=64)
    assert info == {"kind": "kdflow", "model": "lightnn", "num_classes": 5, "image_size": 64,
                    "classes": None}
    assert not teacher.training and next(teacher.parameters()).device.type == "cpu"
    assert same_outputs(teacher, original, 64)
    assert read_state(path)["format"] == checkpoint.FORMAT  # returned as it is


@pytest.mark.parametrize("name,size", [("resnet8", 32), ("lightnn", 64)])
def test_a_plain_state_dict_of_a_zoo_net_loads(tmp_path, name, size):
    torch.manual_seed(0)
    original = build_model(name, 10, size)
    torch.save(original.state_dict(), tmp_path / "w.pt")
    teacher, info = load_teacher(tmp_path / "w.pt", model=name, num_classes=10, image_size=size)
    assert info == {"kind": "state_dict"}
    assert same_outputs(teacher, original, size)


def test_a_plain_torchvision_state_dict_loads_into_the_wrapper(tmp_path):
    torch.manual_seed(0)
    original = torchvision.models.mobilenet_v3_small(num_classes=10)
    torch.save(original.state_dict(), tmp_path / "w.pt")
    teacher, info = load_teacher(tmp_path / "w.pt", model="mobilenet_v3_small",
                                 num_classes=10, image_size=64)
    assert info == {"kind": "state_dict"} and not teacher.training
    assert same_outputs(teacher, original, 64)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"model": sd, "epoch": 240, "accuracy": 73.1},   # RepDistiller, mdistiller
    lambda sd: {"state_dict": sd, "optimizer": {"lr": 0.1}},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},       # saved from nn.DataParallel
])
def test_wrapped_state_dicts_are_unwrapped(tmp_path, wrap):
    torch.manual_seed(0)
    original = build_model("resnet8", 100)
    torch.save(wrap(original.state_dict()), tmp_path / "w.pt")
    assert read_state(tmp_path / "w.pt").keys() == original.state_dict().keys()
    teacher, _ = load_teacher(tmp_path / "w.pt", model="resnet8", num_classes=100, image_size=32)
    assert same_outputs(teacher, original, 32)


def test_a_kdflow_trained_torchvision_state_dict_loads_too(tmp_path):
    # model.state_dict() of the wrapper itself (keys under "net.").
    torch.manual_seed(0)
    original = build_model("shufflenet_v2_x1_0", 10)
    torch.save(original.state_dict(), tmp_path / "w.pt")
    teacher, _ = load_teacher(tmp_path / "w.pt", model="shufflenet_v2_x1_0", num_classes=10,
                              image_size=32)
    assert same_outputs(teacher, original, 32)


# --- Misfits ------------------------------------------------------------------

def test_a_kdflow_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = save_kdflow(tmp_path / "t.pt", build_model("resnet8"), "resnet8", 10, 32)
    one_line_error(r"kdflow checkpoint of resnet8, but the teacher is configured as resnet14: "
                   r"set teacher.model to resnet8", load_teacher, path, model="resnet14",
                   num_classes=10, image_size=32)


def test_a_state_dict_of_another_architecture_names_the_keys(tmp_path):
    torch.save(build_model("resnet8").state_dict(), tmp_path / "w.pt")
    message = one_line_error(r"does not fit wrn_16_1: missing keys block1.layer.0.bn1.weight, ",
                             load_teacher, tmp_path / "w.pt", model="wrn_16_1", num_classes=10,
                             image_size=32)
    assert "; unexpected keys layer1.0.conv1.weight, " in message
    assert "(and 45 more); name weights saved from a wrn_16_1" in message
    one_line_error(r"does not fit resnet14: missing keys layer1\.1\.", load_teacher,
                   tmp_path / "w.pt", model="resnet14", num_classes=10, image_size=32)


def test_a_state_dict_with_another_layer_shape_names_both_shapes(tmp_path):
    state = build_model("resnet8").state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(8, 16, 3, 3)
    torch.save(state, tmp_path / "w.pt")
    one_line_error(r"does not fit resnet8: layer2.0.conv1.weight is \[8, 16, 3, 3\] in the file, "
                   r"\[32, 16, 3, 3\] in resnet8", load_teacher, tmp_path / "w.pt",
                   model="resnet8", num_classes=10, image_size=32)


def test_another_class_count_is_refused(tmp_path):
    path = save_kdflow(tmp_path / "t.pt", build_model("resnet8", 100), "resnet8", 100, 32)
    one_line_error(r"trained for 100 classes, the dataset has 10", load_teacher, path,
                   model="resnet8", num_classes=10, image_size=32)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "imagenet.pt")
    one_line_error(r"classifier head \(fc\) gives 1000 classes, the dataset has 10",
                   load_teacher, tmp_path / "imagenet.pt", model="resnet18", num_classes=10,
                   image_size=64)


@pytest.mark.parametrize("drop_size", [False, True])
def test_a_kdflow_checkpoint_for_another_image_size_is_refused(tmp_path, drop_size):
    # Without a recorded size the checkpoint is an older kdflow's: 32x32.
    path = save_kdflow(tmp_path / "t.pt", build_model("resnet8"), "resnet8", 10, 32, drop_size)
    one_line_error(r"trained on 32x32 images, the dataset's are 64x64: set data.image_size to 32",
                   load_teacher, path, model="resnet8", num_classes=10, image_size=64)


def test_a_flattened_classifier_tells_the_image_size_it_was_built_for(tmp_path):
    torch.save(build_model("lightnn", 10, 32).state_dict(), tmp_path / "w.pt")
    one_line_error(r"holds a lightnn built for 32x32 images \(its first classifier layer takes "
                   r"1024 inputs, 4096 at 64x64\): set data.image_size to 32", load_teacher,
                   tmp_path / "w.pt", model="lightnn", num_classes=10, image_size=64)


class Opaque:
    """Any class: its instances pickle as code to import."""


class RunsCode:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_pickled_objects_are_refused_and_never_run(tmp_path):
    torch.save({"w": Opaque()}, tmp_path / "obj.pt")
    one_line_error(r"holds pickled objects \(tests.test_weights.Opaque\), not only tensors: "
                   r"kdflow loads weights only .*save model.state_dict\(\)", read_state,
                   tmp_path / "obj.pt")
    sentinel = tmp_path / "ran"
    torch.save({"model": RunsCode(str(sentinel))}, tmp_path / "code.pt")
    one_line_error(r"holds pickled objects .*, not only tensors", load_teacher,
                   tmp_path / "code.pt", model="resnet8", num_classes=10, image_size=32)
    assert not sentinel.exists()


@pytest.mark.parametrize("content,described", [
    ({"model": "resnet8", "epoch": 3}, "a dict with keys 'model', 'epoch'"),
    ({"model": {"fc.weight": 3}}, "a dict with keys 'model'"),
    ([torch.zeros(3)], "a list"),
    (torch.zeros(3), "a Tensor"),
    ({}, "an empty dict"),
])
def test_a_file_without_a_state_dict_is_refused(tmp_path, content, described):
    torch.save(content, tmp_path / "w.pt")
    one_line_error(rf"holds {described}, not weights: kdflow reads a kdflow checkpoint, a state "
                   r"dict .* under 'state_dict' or 'model'", read_state, tmp_path / "w.pt")


def test_unreadable_files_are_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    one_line_error(r"cannot read .*junk.pt: it is no file torch.save wrote", read_state,
                   tmp_path / "junk.pt")
    torch.save(build_model("lightnn").state_dict(), tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:5000])
    one_line_error(r"cannot read .*cut.pt: it is no file torch.save wrote, or a truncated one",
                   read_state, tmp_path / "cut.pt")
    one_line_error(r"weights file .*missing.pt does not exist", read_state, tmp_path / "missing.pt")


# --- Fine-tuning starts -------------------------------------------------------

def test_init_from_imagenet_weights_replaces_the_head_and_loads_the_rest(tmp_path):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18().state_dict()
    torch.save(imagenet, tmp_path / "imagenet.pt")
    torch.manual_seed(1)
    model = build_model("resnet18", 10, 64)
    head_before = model.net.fc.weight.detach().clone()
    info = init_from(model, tmp_path / "imagenet.pt", num_classes=10)
    assert info == {"kind": "state_dict", "head_replaced": True, "head": "fc",
                    "from_classes": 1000, "to_classes": 10}
    assert torch.equal(model.net.layer3[0].conv1.weight, imagenet["layer3.0.conv1.weight"])
    assert torch.equal(model.net.bn1.running_var, imagenet["bn1.running_var"])
    assert torch.equal(model.net.fc.weight, head_before)


def test_init_from_a_kdflow_checkpoint_for_other_classes(tmp_path):
    torch.manual_seed(0)
    source = build_model("lightnn", 100, 64)
    path = save_kdflow(tmp_path / "t.pt", source, "lightnn", 100, 64)
    torch.manual_seed(1)
    model = build_model("lightnn", 10, 64)
    head_before = model.classifier[3].weight.detach().clone()
    info = init_from(model, path, num_classes=10)
    assert info == {"kind": "kdflow", "model": "lightnn", "num_classes": 100, "image_size": 64,
                    "head_replaced": True, "head": "classifier.3", "from_classes": 100,
                    "to_classes": 10}
    assert torch.equal(model.classifier[0].weight, source.classifier[0].weight)
    assert torch.equal(model.classifier[3].weight, head_before)


def test_init_from_the_same_class_count_loads_everything(tmp_path):
    torch.manual_seed(0)
    source = build_model("wrn_16_1", 10)
    torch.save({"model": source.state_dict()}, tmp_path / "w.pt")
    torch.manual_seed(1)
    model = build_model("wrn_16_1", 10)
    assert init_from(model, tmp_path / "w.pt", num_classes=10) == {
        "kind": "state_dict", "head_replaced": False}
    assert same_outputs(model, source, 32)


def test_init_from_refuses_other_misfits(tmp_path):
    path = save_kdflow(tmp_path / "t.pt", build_model("resnet8"), "resnet8", 10, 32)
    one_line_error(r"kdflow checkpoint of resnet8, not of resnet14", init_from,
                   build_model("resnet14"), path, num_classes=10)
    torch.save(build_model("lightnn", 100, 32).state_dict(), tmp_path / "w.pt")
    one_line_error(r"built for 32x32 images \(its first classifier layer takes 1024 inputs, "
                   r"4096 at 64x64\): set data.image_size to 32", init_from,
                   build_model("lightnn", 10, 64), tmp_path / "w.pt", num_classes=10)
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pt")
    one_line_error(r"does not fit resnet18: .*unexpected keys layer1.2", init_from,
                   build_model("resnet18"), tmp_path / "r34.pt", num_classes=10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_head_is_the_layer_that_gives_the_logits(name):
    model = build_model(name, 7).eval()
    prefix, head = _head(model)
    assert head.out_features == 7
    seen = []
    head.register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 32))
    assert len(seen) == 1 and torch.equal(seen[0], logits)
    assert isinstance(dict(model.named_modules())[prefix], nn.Linear)
