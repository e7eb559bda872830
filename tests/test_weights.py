"""Weights from outside: teachers and starting points read from files, each misfit one clear line."""

import logging
import os

import pytest
import torch
import torchvision
from torch import nn

from kdflow import KdflowError
from kdflow.data.arrays import CIFAR10_MEAN, CIFAR10_STD
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


# The data a file is checked against: class names and normalisation.
# As kdflow.models.checkpoint.normalisation writes them.
CIFAR10 = {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
CIFAR100 = {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}


def names(n):
    return [f"class{i}" for i in range(n)]


def save_kdflow(path, model, name, num_classes, image_size, drop_size=False, *,
                classes=None, normalisation=CIFAR10, older=False):
    """A kdflow checkpoint as kdflow writes it (classes default to names(n));
    `older`: without the class names and normalisation an older kdflow did
    not record; `drop_size`: without the image size too."""
    checkpoint.save(path, state_dict=model.state_dict(), model=name, num_classes=num_classes,
                    image_size=image_size,
                    classes=None if older else classes or names(num_classes),
                    normalisation=None if older else normalisation)
    if drop_size:  # as an older kdflow wrote it
        ckpt = torch.load(path, weights_only=True)
        del ckpt["image_size"]
        torch.save(ckpt, path)
    return path


def teacher_of(path, model, num_classes=10, image_size=32, *, classes=None,
               normalisation=CIFAR10):
    """load_teacher for data of names(num_classes) (or `classes`)."""
    return load_teacher(path, model=model, classes=classes or names(num_classes),
                        image_size=image_size, normalisation=normalisation)


def init_of(model, path, num_classes=10, image_size=32, *, classes=None,
            normalisation=CIFAR10):
    return init_from(model, path, classes=classes or names(num_classes), image_size=image_size,
                     normalisation=normalisation)


def same_outputs(a, b, size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


# --- Round trips --------------------------------------------------------------

def test_a_kdflow_checkpoint_loads_as_its_teacher(tmp_path):
    torch.manual_seed(0)
    original = build_model("lightnn", 5, 64)
    path = save_kdflow(tmp_path / "t.pt", original, "lightnn", 5, 64)
    teacher, info = teacher_of(path, "lightnn", 5, 64)
    assert info == {"kind": "kdflow", "model": "lightnn", "num_classes": 5, "image_size": 64,
                    "checked": ["architecture", "class count", "class names", "image size",
                                "normalisation"],
                    "unchecked": []}
    assert not teacher.training and next(teacher.parameters()).device.type == "cpu"
    assert same_outputs(teacher, original, 64)
    assert read_state(path)["format"] == checkpoint.FORMAT  # returned as it is


@pytest.mark.parametrize("name,size", [("resnet8", 32), ("lightnn", 64)])
def test_a_plain_state_dict_of_a_zoo_net_loads(tmp_path, name, size):
    torch.manual_seed(0)
    original = build_model(name, 10, size)
    torch.save(original.state_dict(), tmp_path / "w.pt")
    teacher, info = teacher_of(tmp_path / "w.pt", name, 10, size)
    assert info["kind"] == "state_dict"
    assert same_outputs(teacher, original, size)


def test_what_a_plain_state_dict_leaves_unchecked_is_said(tmp_path):
    # A resnet8's weights load at 32 and at 224 alike: its size is no check.
    torch.save(build_model("resnet8").state_dict(), tmp_path / "r.pt")
    for size in (32, 224):
        _, info = teacher_of(tmp_path / "r.pt", "resnet8", 10, size)
        assert info == {"kind": "state_dict", "checked": ["architecture", "class count"],
                        "unchecked": ["class names and order (a plain state dict has none)",
                                      "image size (resnet8's weights fit any size)",
                                      "normalisation (a plain state dict records none)"]}
    # A flattened-map classifier's first layer pins the size to within 3 pixels.
    torch.save(build_model("lightnn", 10, 64).state_dict(), tmp_path / "l.pt")
    _, info = teacher_of(tmp_path / "l.pt", "lightnn", 10, 66)
    assert info["checked"] == ["architecture", "class count",
                               "image size (lightnn's weights fit 64 to 67 alike)"]
    assert info["unchecked"] == ["class names and order (a plain state dict has none)",
                                 "normalisation (a plain state dict records none)"]


def test_an_older_kdflow_checkpoint_says_what_it_did_not_record(tmp_path):
    path = save_kdflow(tmp_path / "t.pt", build_model("resnet8"), "resnet8", 10, 32,
                       drop_size=True, older=True)
    _, info = teacher_of(path, "resnet8", 10, 32)
    # Its size is known all the same: older kdflow trained on 32x32 only.
    assert info["checked"] == ["architecture", "class count", "image size"]
    assert info["unchecked"] == [
        "class names and order (an older kdflow checkpoint records none)",
        "normalisation (an older kdflow checkpoint records none)"]


def test_a_plain_torchvision_state_dict_loads_into_the_wrapper(tmp_path):
    torch.manual_seed(0)
    original = torchvision.models.mobilenet_v3_small(num_classes=10)
    torch.save(original.state_dict(), tmp_path / "w.pt")
    teacher, info = teacher_of(tmp_path / "w.pt", "mobilenet_v3_small", 10, 64)
    assert info["kind"] == "state_dict" and not teacher.training
    assert same_outputs(teacher, original, 64)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"model": sd, "epoch": 240, "accuracy": 73.1},   # RepDistiller, mdistiller
    lambda sd: {"state_dict": sd, "optimizer": {"lr": 0.1}},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},       # saved from nn.DataParallel
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},    # a torch.compile'd model
    lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()},  # Lightning
                "epoch": 3},
    lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},  # compiled, in DDP
], ids=["repdistiller", "state_dict", "dataparallel", "compiled", "lightning",
        "compiled-ddp"])
def test_wrapped_state_dicts_are_unwrapped(tmp_path, wrap):
    torch.manual_seed(0)
    original = build_model("resnet8", 100)
    torch.save(wrap(original.state_dict()), tmp_path / "w.pt")
    assert read_state(tmp_path / "w.pt").keys() == original.state_dict().keys()
    teacher, _ = teacher_of(tmp_path / "w.pt", "resnet8", 100, 32)
    assert same_outputs(teacher, original, 32)


def test_a_kdflow_trained_torchvision_state_dict_loads_too(tmp_path):
    # model.state_dict() of the wrapper itself (keys under "net.").
    torch.manual_seed(0)
    original = build_model("shufflenet_v2_x1_0", 10)
    torch.save(original.state_dict(), tmp_path / "w.pt")
    teacher, _ = teacher_of(tmp_path / "w.pt", "shufflenet_v2_x1_0", 10, 32)
    assert same_outputs(teacher, original, 32)


# --- Misfits ------------------------------------------------------------------

def test_a_kdflow_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = save_kdflow(tmp_path / "t.pt", build_model("resnet8"), "resnet8", 10, 32)
    one_line_error(r"kdflow checkpoint of resnet8, but the teacher is configured as resnet14: "
                   r"set teacher.model to resnet8", teacher_of, path, "resnet14", 10, 32)


def test_a_prefix_only_some_keys_have_is_kept(tmp_path):
    # A net whose first layer happens to be called "model" is no wrapper.
    state = {"model.weight": torch.zeros(1), "head.weight": torch.zeros(1)}
    torch.save(state, tmp_path / "w.pt")
    assert read_state(tmp_path / "w.pt").keys() == state.keys()


def test_a_state_dict_of_another_architecture_names_the_keys(tmp_path):
    torch.save(build_model("resnet8").state_dict(), tmp_path / "w.pt")
    message = one_line_error(r"does not fit wrn_16_1: missing keys block1.layer.0.bn1.weight, ",
                             teacher_of, tmp_path / "w.pt", "wrn_16_1", 10, 32)
    # Both counts leave out BatchNorm's batch counters, which a file from
    # before PyTorch 0.4.1 lacks: 62 weights of wrn_16_1 missing, 40 of
    # resnet8's unexpected (48 with its 8 counters).
    assert "missing keys block1.layer.0.bn1.weight, " in message
    assert "(and 59 more); unexpected keys layer1.0.conv1.weight, " in message
    assert "(and 37 more); name weights saved from a wrn_16_1" in message
    assert "num_batches_tracked" not in message
    one_line_error(r"does not fit resnet14: missing keys layer1\.1\.", teacher_of,
                   tmp_path / "w.pt", "resnet14", 10, 32)


def test_a_state_dict_with_another_layer_shape_names_both_shapes(tmp_path):
    state = build_model("resnet8").state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(8, 16, 3, 3)
    torch.save(state, tmp_path / "w.pt")
    one_line_error(r"does not fit resnet8: layer2.0.conv1.weight is \[8, 16, 3, 3\] in the file, "
                   r"\[32, 16, 3, 3\] in resnet8", teacher_of, tmp_path / "w.pt", "resnet8", 10, 32)


def test_another_class_count_is_refused(tmp_path):
    path = save_kdflow(tmp_path / "t.pt", build_model("resnet8", 100), "resnet8", 100, 32)
    one_line_error(r"trained for 100 classes, the dataset has 10", teacher_of, path,
                   "resnet8", 10, 32)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "imagenet.pt")
    one_line_error(r"classifier head \(fc\) gives 1000 classes, the dataset has 10",
                   teacher_of, tmp_path / "imagenet.pt", "resnet18", 10, 64)


@pytest.mark.parametrize("drop_size", [False, True])
def test_a_kdflow_checkpoint_for_another_image_size_is_refused(tmp_path, drop_size):
    # Without a recorded size the checkpoint is an older kdflow's: 32x32.
    path = save_kdflow(tmp_path / "t.pt", build_model("resnet8"), "resnet8", 10, 32, drop_size)
    one_line_error(r"trained on 32x32 images, the dataset's are 64x64: set data.image_size to 32",
                   teacher_of, path, "resnet8", 10, 64)


def test_a_kdflow_checkpoint_of_other_class_names_is_refused_naming_the_difference(tmp_path):
    path = save_kdflow(tmp_path / "t.pt", build_model("resnet8"), "resnet8", 10, 32,
                       classes=names(8) + ["cat", "dog"])
    message = one_line_error(r"trained on other classes than this dataset's \(same count, 10\): "
                             r"only in the file: 'cat', 'dog'; only in the data: 'class8', "
                             r"'class9'; its logits would mean other classes", teacher_of, path,
                             "resnet8", 10, 32)
    assert "fine-tune from it instead (teacher.init" in message
    # The same names in another order are other classes to the logits.
    swapped = names(10)
    swapped[2], swapped[5] = swapped[5], swapped[2]
    path = save_kdflow(tmp_path / "o.pt", build_model("resnet8"), "resnet8", 10, 32,
                       classes=swapped)
    one_line_error(r"the same names in another order \(class 2 is 'class5' there, 'class2' "
                   r"here\)", teacher_of, path, "resnet8", 10, 32)


def test_a_kdflow_checkpoint_of_another_normalisation_is_refused(tmp_path):
    path = save_kdflow(tmp_path / "t.pt", build_model("resnet8"), "resnet8", 10, 32,
                       normalisation=CIFAR100)
    one_line_error(r"trained on inputs normalised with mean \(0.5071, 0.4865, 0.4409\) std "
                   r"\(0.2673, 0.2564, 0.2762\), this dataset's are normalised with mean "
                   r"\(0.4914, 0.4822, 0.4465\) .*: it would see every image shifted",
                   teacher_of, path, "resnet8", 10, 32)


def test_normalisations_within_float_noise_are_the_same(tmp_path):
    # CIFAR-10's statistics as published (4 decimals) and as kdflow computes them.
    computed = checkpoint.normalisation((0.491401, 0.48216, 0.446531),
                                        (0.24703, 0.243485, 0.261588))
    path = save_kdflow(tmp_path / "t.pt", build_model("resnet8"), "resnet8", 10, 32,
                       normalisation=computed)
    _, info = teacher_of(path, "resnet8", 10, 32)
    assert "normalisation" in info["checked"]
    shifted = checkpoint.normalisation((0.4916, 0.4822, 0.4465), CIFAR10_STD)
    path = save_kdflow(tmp_path / "s.pt", build_model("resnet8"), "resnet8", 10, 32,
                       normalisation=shifted)
    one_line_error(r"normalised with mean \(0.4916,", teacher_of, path, "resnet8", 10, 32)


@pytest.mark.parametrize("kind", ["state_dict", "kdflow"])
def test_non_finite_weights_are_refused_naming_the_first_tensor_and_the_count(tmp_path, kind):
    state = build_model("resnet8").state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["layer3.0.bn1.running_var"][3] = float("inf")
    state["fc.bias"][:] = float("-inf")
    path = tmp_path / "w.pt"
    if kind == "kdflow":
        checkpoint.save(path, state_dict=state, model="resnet8", num_classes=10, image_size=32)
    else:
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    for load in (lambda: teacher_of(path, "resnet8", 10, 32),
                 lambda: init_of(build_model("resnet8"), path)):
        message = one_line_error(r"w.pt holds weights that are not finite: 3 of its \d+ tensors "
                                 r"have NaN or inf values \(the first: layer2.0.conv1.weight\)",
                                 load)
        assert "name weights saved before" in message


def test_a_flattened_classifier_tells_the_image_size_it_was_built_for(tmp_path):
    torch.save(build_model("lightnn", 10, 32).state_dict(), tmp_path / "w.pt")
    one_line_error(r"holds a lightnn built for 32x32 images \(its first classifier layer takes "
                   r"1024 inputs, 4096 at 64x64\): set data.image_size to 32", teacher_of,
                   tmp_path / "w.pt", "lightnn", 10, 64)


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
    one_line_error(r"holds pickled objects .*, not only tensors", teacher_of,
                   tmp_path / "code.pt", "resnet8", 10, 32)
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
    info = init_of(model, tmp_path / "imagenet.pt", 10, 64)
    assert info == {"kind": "state_dict", "head_replaced": True, "head": "fc",
                    "from_classes": 1000, "to_classes": 10,
                    "checked": ["architecture", "class count"],
                    "unchecked": ["class names and order (a plain state dict has none)",
                                  "image size (resnet18's weights fit any size)",
                                  "normalisation (a plain state dict records none)"],
                    "notes": []}
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
    info = init_of(model, path, 10, 64)
    assert info == {"kind": "kdflow", "model": "lightnn", "num_classes": 100, "image_size": 64,
                    "head_replaced": True, "head": "classifier.3", "from_classes": 100,
                    "to_classes": 10,
                    "checked": ["architecture", "class count", "class names", "image size",
                                "normalisation"],
                    "unchecked": [], "notes": []}
    assert torch.equal(model.classifier[0].weight, source.classifier[0].weight)
    assert torch.equal(model.classifier[3].weight, head_before)


def test_init_from_the_same_class_count_loads_everything(tmp_path):
    torch.manual_seed(0)
    source = build_model("wrn_16_1", 10)
    torch.save({"model": source.state_dict()}, tmp_path / "w.pt")
    torch.manual_seed(1)
    model = build_model("wrn_16_1", 10)
    info = init_of(model, tmp_path / "w.pt")
    assert info["kind"] == "state_dict" and not info["head_replaced"]
    assert same_outputs(model, source, 32)


def test_init_from_refuses_other_misfits(tmp_path):
    path = save_kdflow(tmp_path / "t.pt", build_model("resnet8"), "resnet8", 10, 32)
    one_line_error(r"kdflow checkpoint of resnet8, not of resnet14", init_of,
                   build_model("resnet14"), path)
    torch.save(build_model("lightnn", 100, 32).state_dict(), tmp_path / "w.pt")
    one_line_error(r"built for 32x32 images \(its first classifier layer takes 1024 inputs, "
                   r"4096 at 64x64\): set data.image_size to 32", init_of,
                   build_model("lightnn", 10, 64), tmp_path / "w.pt", 10, 64)
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pt")
    one_line_error(r"does not fit resnet18: .*unexpected keys layer1.2", init_of,
                   build_model("resnet18"), tmp_path / "r34.pt")


def test_init_from_other_class_names_of_the_same_count_starts_a_fresh_head(tmp_path, caplog):
    torch.manual_seed(0)
    source = build_model("lightnn", 10, 64)
    path = save_kdflow(tmp_path / "t.pt", source, "lightnn", 10, 64,
                       classes=names(9) + ["zebra"])
    torch.manual_seed(1)
    model = build_model("lightnn", 10, 64)
    head_before = model.classifier[3].weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="kdflow"):
        info = init_of(model, path, 10, 64)
    assert info["head_replaced"] and (info["from_classes"], info["to_classes"]) == (10, 10)
    assert info["notes"] == ["class names: only in the file: 'zebra'; only in the data: "
                             "'class9'"]
    assert "class names" in info["checked"] and info["unchecked"] == []
    assert "differs from the data in class names: only in the file: 'zebra'" in caplog.text
    assert torch.equal(model.classifier[3].weight, head_before)
    assert torch.equal(model.classifier[0].weight, source.classifier[0].weight)


def test_init_from_another_size_or_normalisation_loads_and_notes_it(tmp_path, caplog):
    torch.manual_seed(0)
    source = build_model("resnet8", 10)
    path = save_kdflow(tmp_path / "t.pt", source, "resnet8", 10, 32, normalisation=CIFAR100)
    model = build_model("resnet8", 10, 64)
    with caplog.at_level(logging.INFO, logger="kdflow"):
        info = init_of(model, path, 10, 64)
    assert not info["head_replaced"]
    assert info["notes"] == [
        "image size: 32x32 there, 64x64 here",
        "normalisation: mean (0.5071, 0.4865, 0.4409) std (0.2673, 0.2564, 0.2762) there, "
        "mean (0.4914, 0.4822, 0.4465) std (0.247, 0.2435, 0.2616) here"]
    assert "differs from the data in normalisation" in caplog.text
    assert same_outputs(model, source, 32)


def test_init_from_an_older_kdflow_checkpoint_says_what_it_could_not_check(tmp_path):
    path = save_kdflow(tmp_path / "t.pt", build_model("resnet8"), "resnet8", 10, 32, older=True)
    info = init_of(build_model("resnet8"), path)
    assert info["unchecked"] == [
        "class names and order (an older kdflow checkpoint records none)",
        "normalisation (an older kdflow checkpoint records none)"]
    assert not info["head_replaced"] and info["notes"] == []


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
