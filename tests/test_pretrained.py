"""torchvision's weights by name (teacher.init, student.init): resolution to
torchvision's own URL and hash, the verified fetch from a local copy or
torch.hub's cache, and a fine-tune from a file that matches.

No model hub is reachable from the test machines: the files that match are
the tests' own, named as torchvision names its files (<arch>-<SHA-256
prefix>.pth) and registered (kdflow.models.pretrained.register) in place of
torchvision's; a file for torchvision's real weights can only mismatch."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.hub
import torchvision.models

from kdflow import KdflowError
from kdflow.data.arrays import channel_stats, write_dataset, write_split
from kdflow.models import checkpoint, pretrained, weights
from kdflow.models.zoo import build_model
from kdflow.train.job import train
from kdflow.workflow.config import validate
from tests.helpers.archives import CLASSES, synthetic_images
from tests.helpers.workflow import base_config, deep_update, planned_jobs, snakemake

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
ENGINE = {"precision": "fp32", "compile": False, "deterministic": True}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch,member,full", [
    ("resnet18", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"),
    ("resnet50", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2"),
    ("mobilenet_v3_small", "DEFAULT", "MobileNet_V3_Small_Weights.DEFAULT"),
])
def test_a_name_resolves_to_torchvision_s_own_url_and_hash(arch, member, full):
    theirs = torchvision.models.get_weight(full)
    mine = pretrained.published(arch, member)
    assert mine.url == theirs.url
    assert mine.name == f"{type(theirs).__name__}.{theirs.name}"
    # The hash torch.hub's check_hash verifies: the prefix in the file name.
    assert mine.sha256 == torch.hub.HASH_REGEX.search(mine.file).group(1)
    assert len(mine.classes) == len(theirs.meta["categories"]) == 1000
    assert mine.normalisation == IMAGENET and mine.image_size == 224
    assert mine.max_bytes > theirs.meta["_file_size"] * 1e6


def test_resnet18_s_weights_are_torchvision_s_published_file():
    # Pinned against torchvision's documentation, not only its own code.
    w = pretrained.published("resnet18", "IMAGENET1K_V1")
    assert (w.url, w.sha256) == ("https://download.pytorch.org/models/resnet18-f37072fd.pth",
                                 "f37072fd")
    source, _ = pretrained.init_source({"model": "resnet18",
                                        "init": {"torchvision": "DEFAULT", "url": "/c.pth"}})
    assert source == {"torchvision": "ResNet18_Weights.IMAGENET1K_V1", "url": w.url,
                      "sha256": "f37072fd", "local": "/c.pth"}


def one_line(e) -> str:
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_a_name_the_architecture_lacks_is_a_config_error_listing_what_it_has():
    with pytest.raises(KdflowError) as e:
        validate({"teacher": {"model": "resnet18", "init": {"torchvision": "IMAGENET1K_V2"}}})
    assert "teacher.init: torchvision's resnet18 has no weights 'IMAGENET1K_V2': it has " \
        "IMAGENET1K_V1 (DEFAULT: IMAGENET1K_V1)" in str(e.value)
    with pytest.raises(KdflowError, match="torchvision publishes no weights for lightnn"):
        validate({"student": {"model": ["lightnn", "resnet18"],
                              "init": {"torchvision": "DEFAULT"}}})


def test_students_take_init_in_either_form_and_a_file_fits_one_architecture():
    c = validate({"student": {"model": ["resnet18", "mobilenet_v3_small"],
                              "init": {"torchvision": "DEFAULT", "url": "/mirror/w.pth"}}})
    assert c["student"]["init"] == {"torchvision": "DEFAULT", "url": "/mirror/w.pth"}
    md5 = "A" * 32
    c = validate({"student": {"model": "lightnn", "init": {"url": "/s.pt", "md5": md5}}})
    assert c["student"]["init"]["md5"] == md5.lower()
    with pytest.raises(KdflowError, match=r"student.init \{url, md5\} is one file, which fits "
                                          "one architecture, and student.model lists 2"):
        validate({"student": {"model": ["lightnn", "resnet8"],
                              "init": {"url": "/s.pt", "md5": md5}}})


@pytest.mark.parametrize("value,says", [
    ("IMAGENET1K_V1", "teacher.init must be a mapping, not a string: write {torchvision: "
                      "IMAGENET1K_V1}"),
    ({"torchvision": "IMAGENET1K_V1", "md5": "0" * 32},
     "teacher.init: unknown key 'md5': torchvision's weights take torchvision"),
    ({"torchvision": "imagenet"}, "teacher.init.torchvision 'imagenet' is not a weights name"),
    ({"torchvision": "DEFAULT", "url": ""}, "teacher.init.url '' is not a URL or path"),
])
def test_a_wrong_torchvision_init_names_the_real_problem(value, says):
    with pytest.raises(KdflowError) as e:
        validate({"teacher": {"model": "resnet18", "init": value}})
    assert says in str(e.value) and "is not of type" not in str(e.value), str(e.value)


def test_a_local_copy_whose_hash_differs_is_refused_in_one_line(tmp_path):
    copy = tmp_path / "resnet18-f37072fd.pth"   # its name says nothing: the hash is torchvision's
    torch.save(torchvision.models.resnet18().state_dict(), copy)
    w = pretrained.published("resnet18", "IMAGENET1K_V1")
    dest = tmp_path / "init.pt"
    with pytest.raises(KdflowError) as e:
        pretrained.fetch(w, dest, local=copy.as_uri(), key="teacher.init")
    assert one_line(e) == (
        f"sha256 mismatch for {copy.as_uri()}: expected f37072fd, got {sha256(copy)[:8]}. "
        "It is not torchvision's ResNet18_Weights.IMAGENET1K_V1: point teacher.init.url at a "
        f"copy of {w.url}, or remove teacher.init.url to download it")
    assert not dest.exists() and not list(tmp_path.glob("*.part"))


def test_torch_hub_s_cache_serves_offline_and_a_damaged_copy_there_is_refused(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch/hub/checkpoints"
    cache.mkdir(parents=True)
    state = tmp_path / "w.pth"
    torch.save(build_model("resnet8").state_dict(), state)
    # A registered file whose URL no test can reach: only the cache serves it.
    name = f"resnet8-{sha256(state)[:10]}.pth"
    w = pretrained.register(f"https://download.invalid/{name}", name="Test.V1", arch="resnet8")
    (cache / name).write_bytes(state.read_bytes())
    assert pretrained.fetch(w, tmp_path / "a.pt") == str(cache / name)
    assert sha256(tmp_path / "a.pt") == sha256(state)
    (cache / name).write_bytes(state.read_bytes()[:-1] + b"x")
    with pytest.raises(KdflowError) as e:
        pretrained.fetch(w, tmp_path / "b.pt", key="student.init")
    assert f"delete {cache / name} (a damaged copy)" in one_line(e)


def test_a_file_name_without_a_hash_cannot_be_verified():
    with pytest.raises(KdflowError, match=r"w.pth carries no SHA-256 prefix in its name") as e:
        pretrained.register("file:///m/w.pth", name="X", arch="resnet18")
    one_line(e)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A converted dataset (CIFAR-10's class names, synthetic images) and its split."""
    where = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    (x, y), (xt, yt) = synthetic_images(120, rng), synthetic_images(20, rng)
    dataset, split = where / "data.npz", where / "split.npz"
    write_dataset(dataset, "cifar10", x.reshape(-1, 3, 32, 32), np.array(y, np.int64),
                  xt.reshape(-1, 3, 32, 32), np.array(yt, np.int64), CLASSES)
    write_split(dataset, split, val_size=20, seed=0)
    return str(dataset), str(split)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A file standing in for torchvision's mobilenet_v3_small weights (its
    ImageNet head, 1000 classes), under a file URL named as torchvision
    names its files, registered with torchvision's description of them."""
    where = tmp_path_factory.mktemp("hub")
    torch.manual_seed(7)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    tmp = where / "w.pth"
    torch.save(state, tmp)
    path = tmp.rename(where / f"mobilenet_v3_small-{sha256(tmp)[:8]}.pth")
    real = pretrained.published("mobilenet_v3_small", "DEFAULT")
    w = pretrained.register(path.as_uri(), name="MobileNet_V3_Small_Weights.TEST",
                            arch="mobilenet_v3_small", classes=real.classes,
                            normalisation=real.normalisation, image_size=real.image_size)
    return w, state


def test_a_matching_file_fine_tunes_with_its_head_replaced_and_logged(tmp_path, small_data,
                                                                     registered, caplog,
                                                                     monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # no cached copy
    dataset, split = small_data
    w, state = registered
    init = tmp_path / "init.pt"
    assert pretrained.fetch(w, init, key="student.init") == w.url
    training = validate({"student": {"model": "mobilenet_v3_small", "epochs": 1,
                                     "batch_size": 32}})["student"]
    arm = {"path": "mobilenet_v3_small/ce", "role": "student_baseline",
           "model": "mobilenet_v3_small", "training": training, "method": None,
           "setting": None, "values": {}}
    out = tmp_path / "tuned"
    with caplog.at_level(logging.INFO, logger="kdflow"):
        train(arm, dataset=dataset, split=split, out_model=str(out / "model.pt"),
              out_history=str(out / "history.csv"), seed=0, device="cpu", engine=ENGINE, placement={},
              threads=1, init=str(init), init_record=w.record(),
              init_described=pretrained.described(w))
    assert "classifier head classifier.3 replaced (1000 classes there, 10 here), all else " \
        "loaded" in caplog.text
    assert "differs from the data in image size: 224x224 there (published with the " \
        "weights), 32x32 here" in caplog.text
    tuned = checkpoint.load(out / "model.pt")
    record = tuned["init"]
    assert record["torchvision"] == w.name and record["sha256"] == w.sha256
    assert record["head_replaced"] and (record["from_classes"], record["to_classes"]) == (1000, 10)
    assert record["checked"] == ["architecture", "class count",
                                 "class names (published with the weights)",
                                 "normalisation (published with the weights)"]
    assert record["unchecked"] == ["image size (mobilenet_v3_small's weights fit any size)"]
    # Training normalised with the data's statistics; the weights' are noted.
    with np.load(dataset) as d:
        data_norm = checkpoint.normalisation(*channel_stats(d))
    assert tuned["normalisation"] == data_norm
    assert re.match(r"normalisation: mean \(0\.485, 0\.456, 0\.406\) std \(0\.229, 0\.224, "
                    r"0\.225\) there \(published with the weights\), mean \(.*here \(the "
                    r"data's, which training uses\)$", record["notes"][1])


def test_the_weights_are_loaded_as_published_and_the_head_is_the_seeded_one(registered):
    # What makes the plain and the distilled student of a seed start alike:
    # everything but the head from the file, the head from the seeded build.
    w, state = registered
    path = w.url[len("file://"):]
    built = []
    for _ in range(2):
        torch.manual_seed(3)
        model = build_model("mobilenet_v3_small", 10, 32)
        info = weights.init_from(model, path, classes=CLASSES, image_size=32,
                                 normalisation=IMAGENET, described=pretrained.described(w))
        assert info["notes"] == ["image size: 224x224 there (published with the weights), "
                                 "32x32 here"]
        built.append(model.net.state_dict())
    assert torch.equal(built[0]["features.0.0.weight"], state["features.0.0.weight"])
    assert all(torch.equal(v, built[1][k]) for k, v in built[0].items())


def test_the_fetch_rules_take_torchvision_names_and_refuse_a_differing_copy(tmp_path,
                                                                           tiny_archive):
    # Only the fetch jobs run (no training): a student architecture each,
    # by torchvision's name; the teacher's {url, md5}. No hub is reachable,
    # so the local copies of torchvision's weights can only differ.
    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("deepnn", 100).state_dict(), teacher)
    copy = tmp_path / "copy.pth"
    torch.save({"w": torch.zeros(3)}, copy)
    config = deep_update(base_config(*tiny_archive), {
        "teacher": {"init": {"url": str(teacher),
                             "md5": hashlib.md5(teacher.read_bytes()).hexdigest()}},
        "student": {"model": ["resnet18", "mobilenet_v3_small"],
                    "init": {"torchvision": "DEFAULT", "url": copy.as_uri()}}})
    work = tmp_path / "run"
    work.mkdir()
    targets = ["results/teacher/init.pt", "results/students/resnet18/init.pt",
               "results/students/mobilenet_v3_small/init.pt"]
    jobs = planned_jobs(work, config, targets=tuple(targets))
    assert jobs == {"fetch_teacher_init": 1, "fetch_student_init": 2}
    proc = snakemake(work, config, "--keep-going", *targets, check=False)
    assert proc.returncode != 0
    assert (work / targets[0]).exists() and not (work / targets[1]).exists()
    log = (work / "results/logs/students/resnet18/fetch_init.log").read_text()
    errors = [line for line in log.splitlines() if "sha256 mismatch" in line]
    assert len(errors) == 1 and f"for {copy.as_uri()}: expected f37072fd, got " \
        f"{sha256(copy)[:8]}. It is not torchvision's ResNet18_Weights.IMAGENET1K_V1: point " \
        "student.init.url at a copy of https://download.pytorch.org/models/" \
        "resnet18-f37072fd.pth" in errors[0], log
    # The teacher by torchvision's name: planned as a student's is.
    config["teacher"] = {**config["teacher"], "model": "resnet18",
                         "init": {"torchvision": "IMAGENET1K_V1"}}
    assert planned_jobs(work, config, targets=(targets[0],)) == {"fetch_teacher_init": 1}


def test_the_report_names_torchvision_s_weights_or_the_file_a_fine_tune_started_from():
    from kdflow.analysis.report import render_macro

    w = pretrained.published("resnet18", "IMAGENET1K_V1")
    said = " ".join(render_macro("init_source", {**w.record(), "head_replaced": True}).split())
    assert said == ("torchvision's <code>ResNet18_Weights.IMAGENET1K_V1</code> "
                    f"(<code>{w.url}</code>, sha256 <code>f37072fd</code>…)")
    said = " ".join(render_macro("init_source", {"url": "/w.pt", "md5": "0" * 32}).split())
    assert said == f"<code>/w.pt</code> (md5 <code>{'0' * 32}</code>)"
