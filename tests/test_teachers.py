"""Teachers from outside and shared teachers: imported checkpoints, fine-tuning
from given weights, one teacher for every seed.

One real run imports the teacher that the shared `workflow_run` trained
(its seed-0 model.pt, by file URL and md5) and distils 3 seeds of students
from it; a smaller one imports a plain state dict for one seed; the rest
are dry runs and direct calls on the tiny data."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from kdflow import KdflowError
from kdflow.data.arrays import channel_stats, write_dataset, write_split
from kdflow.data.fetch import fetch_archive
from kdflow.models import checkpoint
from kdflow.models.zoo import build_model
from kdflow.train.job import train
from kdflow.train.teacher import import_teacher
from kdflow.workflow.config import validate
from tests.helpers.archives import CLASSES, synthetic_images
from tests.helpers.workflow import base_config, deep_update, planned_jobs, snakemake


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def imported_config(tiny_archive, source: Path, seeds=(0, 1, 2)) -> dict:
    return deep_update(base_config(*tiny_archive), {
        "seeds": list(seeds),
        "teacher": {"checkpoint": {"url": source.as_uri(), "md5": md5(source)}}})


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory, tiny_archive, workflow_run):
    """Run 2 of the test experiment: the teacher run 1 trained for seed 0,
    imported; planned jobs before the run, the workdir and config."""
    first, _ = workflow_run
    workdir = tmp_path_factory.mktemp("imported")
    config = imported_config(tiny_archive, first / "results/seed0/teacher/model.pt")
    jobs = planned_jobs(workdir, config)
    snakemake(workdir, config)
    return workdir, config, jobs


def test_a_teacher_trained_by_one_run_is_imported_by_another(imported_run, workflow_run):
    workdir, config, jobs = imported_run
    assert "train_teacher" not in jobs
    assert jobs["fetch_teacher_checkpoint"] == jobs["import_teacher"] == 1
    assert jobs["evaluate_teacher"] == 1 and jobs["teacher_logits"] == 1
    assert jobs["train_student_baseline"] == jobs["train_student_kd"] == 3
    res = workdir / "results"
    for seed in (0, 1, 2):
        student = checkpoint.load(res / f"seed{seed}/lightnn/kd/T2_w0.25/model.pt")
        assert student["teacher"]["path"] == "results/teacher/model.pt"
        assert student["seed"] == seed
    teacher = checkpoint.load(res / "teacher/model.pt")
    source = config["teacher"]["checkpoint"]
    assert teacher["source"]["url"] == source["url"] and teacher["source"]["md5"] == source["md5"]
    # A kdflow checkpoint records all there is to check, and all was checked.
    assert teacher["source"]["checked"] == ["architecture", "class count", "class names",
                                            "image size", "normalisation"]
    assert teacher["source"]["unchecked"] == []
    assert teacher["normalisation"] == checkpoint.load(
        first_run_teacher(workflow_run))["normalisation"]
    # The same weights on the same data: the same test results as in run 1.
    first, _ = workflow_run
    mine = json.loads((res / "teacher/metrics.json").read_text())
    theirs = json.loads((first / "results/seed0/teacher/metrics.json").read_text())
    assert mine["correct"] == theirs["correct"] and mine["confusion_matrix"] == theirs["confusion_matrix"]
    # The report names where the teacher came from, and that it is shared.
    html = (res / "report.html").read_text()
    assert source["url"] in html and source["md5"] in html
    assert "imported, not trained here" in html and "one teacher shared by all 3 seeds" in html
    head = json.loads((res / "summary/headline.json").read_text())
    assert head["teacher"]["shared"]
    assert head["teacher"]["source"] == {**source, "checked": teacher["source"]["checked"],
                                         "unchecked": []}
    assert head["n_seeds"] == 3
    # Its row stands for every seed's teacher in the tables.
    import pandas as pd
    m = pd.read_csv(res / "summary/metrics.csv")
    t = m[m["arm"] == "teacher"]
    assert sorted(t["seed"]) == [0, 1, 2] and t["accuracy"].nunique() == 1


def stats_of(converted) -> dict:
    """A converted .npz's normalisation as a checkpoint records it."""
    mean, std = channel_stats(converted)
    return {"mean": list(mean), "std": list(std)}


def first_run_teacher(workflow_run) -> Path:
    return workflow_run[0] / "results/seed0/teacher/model.pt"


def test_a_new_teacher_md5_reruns_every_student_but_nothing_upstream(imported_run, tmp_path):
    workdir, config, _ = imported_run
    # Another teacher: the same checkpoint with one weight nudged.
    ckpt = torch.load(workdir / "results/teacher/model.pt", weights_only=True)
    key = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] * 1.01
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    changed = deep_update(config, {"teacher": {"checkpoint": {"url": other.as_uri(),
                                                               "md5": md5(other)}}})
    jobs = planned_jobs(workdir, changed)
    assert jobs.pop("fetch_teacher_checkpoint") == jobs.pop("import_teacher") == 1
    assert jobs.pop("train_student_baseline") == jobs.pop("train_student_kd") == 3
    assert not {"download", "convert", "split", "subset"} & set(jobs)
    assert set(jobs) <= {"teacher_logits", "evaluate", "evaluate_teacher", "aggregate",
                         "report", "all"}


def test_one_shared_trained_teacher_teaches_three_seeds(tmp_path, tiny_archive):
    config = deep_update(base_config(*tiny_archive),
                         {"seeds": [0, 1, 2], "teacher": {"shared": True}})
    jobs = planned_jobs(tmp_path, config)
    assert jobs["train_teacher"] == 1 and jobs["teacher_logits"] == 1
    assert jobs["evaluate_teacher"] == 1
    assert jobs["train_student_baseline"] == jobs["train_student_kd"] == 3
    assert jobs["evaluate"] == 6            # the students only


def test_fine_tuning_plans_the_download_of_its_initial_weights(tmp_path, tiny_archive):
    weights = tmp_path / "init.pt"
    torch.save(build_model("deepnn", 100).state_dict(), weights)
    student = tmp_path / "student.pt"
    torch.save(build_model("lightnn", 100).state_dict(), student)
    config = deep_update(base_config(*tiny_archive), {
        "teacher": {"init": {"url": str(weights), "md5": md5(weights)}},
        "student": {"init": {"url": str(student), "md5": md5(student)}}})
    jobs = planned_jobs(tmp_path, config)
    assert jobs["fetch_teacher_init"] == 1 and jobs["train_teacher"] == 2
    # One file for the plain and the distilled students of every seed.
    assert jobs["fetch_student_init"] == 1
    assert jobs["train_student_baseline"] == jobs["train_student_kd"] == 2


def test_teacher_keys_are_teacher_only_and_exclusive(tiny_archive):
    base = base_config(*tiny_archive)
    ref = {"url": "/x.pt", "md5": "0" * 32}
    with pytest.raises(KdflowError, match="student.checkpoint is a teacher key"):
        validate(deep_update(base, {"student": {"checkpoint": ref}}))
    with pytest.raises(KdflowError, match="student.shared is a teacher key"):
        validate(deep_update(base, {"student": {"shared": True}}))
    with pytest.raises(KdflowError, match="exclude each other"):
        validate(deep_update(base, {"teacher": {"init": ref, "checkpoint": ref}}))
    with pytest.raises(KdflowError, match="md5"):
        validate(deep_update(base, {"teacher": {"checkpoint": {"url": "/x.pt", "md5": "abc"}}}))
    assert validate(deep_update(base, {"teacher": {"checkpoint": ref}}))["teacher"]["shared"]


def test_a_teacher_file_with_the_wrong_md5_is_refused_naming_its_key(tmp_path):
    src = tmp_path / "t.pt"
    torch.save(build_model("lightnn").state_dict(), src)
    with pytest.raises(KdflowError, match=r"set teacher\.checkpoint\.md5") as e:
        fetch_archive(str(src), "0" * 32, tmp_path / "out.pt", key="teacher.checkpoint")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out.pt").exists() and not list(tmp_path.glob("*.part"))


# Direct calls on the test experiment's data (run 1's converted set and split).

def data_of(workflow_run):
    first, _ = workflow_run
    return str(first / "results/data/cifar10.npz"), str(first / "results/data/split.npz")


@pytest.mark.parametrize("make,needle", [
    (lambda p: torch.save(build_model("lightnn").state_dict(), p), "architecture"),
    (lambda p: torch.save(build_model("deepnn", 7).state_dict(), p), "class"),
    (lambda p: torch.save(build_model("deepnn", 10, 64).state_dict(), p), "built for 64x64 images"),
    (lambda p: torch.save({"weights": build_model("deepnn").state_dict(),
                           "note": Path("/tmp")}, p), "pickled"),
], ids=["architecture", "class-count", "image-size", "pickled-code"])
def test_a_teacher_that_does_not_fit_is_refused_clearly(tmp_path, workflow_run, make, needle):
    dataset, split = data_of(workflow_run)
    _, config = workflow_run
    arm = {"path": "teacher", "role": "teacher", "training": validate(config)["teacher"],
           "method": None, "values": {}}
    src = tmp_path / "teacher.pt"
    make(src)
    out = tmp_path / "model.pt"
    with pytest.raises(KdflowError, match=needle) as e:
        import_teacher(arm, source=str(src), source_record={"url": str(src), "md5": md5(src)},
                       dataset=dataset, split=split, out_model=str(out), device="cpu",
                       engine={"precision": "fp32", "compile": False, "deterministic": True},
                       placement={})
    assert len(str(e.value).splitlines()) == 1
    assert not out.exists()


def test_a_fine_tuned_teacher_replaces_the_head_and_starts_elsewhere(tmp_path, workflow_run,
                                                                     caplog):
    dataset, split = data_of(workflow_run)
    _, config = workflow_run
    cfg = validate(config)
    arm = {"path": "teacher", "role": "teacher", "training": cfg["teacher"], "method": None,
           "values": {}}
    # Weights for another task (100 classes), trained a little so they differ
    # from any random start: every layer but the head is what they give.
    torch.manual_seed(123)
    pretrained = build_model("deepnn", 100)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.mul_(1.5)
    init = tmp_path / "imagenet-like.pt"
    torch.save(pretrained.state_dict(), init)

    def run(name, **kw):
        out = tmp_path / name
        train(arm, dataset=dataset, split=split, out_model=str(out / "model.pt"),
              out_history=str(out / "history.csv"), seed=0, device="cpu",
              engine=cfg["engine"], threads=1, placement={}, **kw)
        return checkpoint.load(out / "model.pt"), (out / "history.csv").read_text()

    with caplog.at_level(logging.INFO, logger="kdflow"):
        tuned, tuned_hist = run("tuned", init=str(init),
                                init_record={"url": str(init), "md5": md5(init)})
    assert "classifier head classifier.3 replaced (100 classes there, 10 here)" in caplog.text
    assert tuned["init"]["head_replaced"] and tuned["init"]["md5"] == md5(init)
    assert tuned["init"]["unchecked"] == ["class names and order (a plain state dict has none)",
                                          "normalisation (a plain state dict records none)"]
    with np.load(dataset) as d:
        assert tuned["normalisation"] == stats_of(d)
    scratch, scratch_hist = run("scratch")
    assert scratch["init"] is None
    first = lambda h: h.splitlines()[1].split(",")
    header = tuned_hist.splitlines()[0].split(",")
    col = header.index("val_accuracy")
    assert first(tuned_hist)[col] != first(scratch_hist)[col]


# Direct calls on data written here (no workflow run needed).

ENGINE = {"precision": "fp32", "compile": False, "deterministic": True}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A converted dataset (CIFAR-10's class names, synthetic images) and
    its split; returns (dataset, split, normalisation, teacher plan record)."""
    where = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    (x, y), (xt, yt) = synthetic_images(200, rng), synthetic_images(40, rng)
    dataset, split = where / "data.npz", where / "split.npz"
    write_dataset(dataset, "cifar10", x.reshape(-1, 3, 32, 32), np.array(y, np.int64),
                  xt.reshape(-1, 3, 32, 32), np.array(yt, np.int64), CLASSES)
    write_split(dataset, split, val_size=50, seed=0)
    with np.load(dataset) as d:
        norm = stats_of(d)
    training = validate({"teacher": {"model": "deepnn", "epochs": 1, "batch_size": 32}})
    arm = {"path": "teacher", "role": "teacher", "model": "deepnn",
           "training": training["teacher"], "method": None, "setting": None, "values": {}}
    return str(dataset), str(split), norm, arm


def kdflow_file(path: Path, *, model="deepnn", classes=CLASSES, normalisation=None,
                state=None) -> Path:
    """A kdflow checkpoint of `model` for 10 classes at 32x32; without
    `normalisation`, as an older kdflow wrote it (no class names either)."""
    torch.manual_seed(0)
    checkpoint.save(path, state_dict=state or build_model(model).state_dict(), model=model,
                    num_classes=10, image_size=32,
                    classes=classes if normalisation else None, normalisation=normalisation)
    return path


def import_into(tmp_path, small_data, src: Path, model="deepnn"):
    dataset, split, _, arm = small_data
    out = tmp_path / "model.pt"
    import_teacher({**arm, "model": model, "training": {"model": model}}, source=str(src),
                   source_record={"url": src.as_uri(), "md5": md5(src).upper()},
                   dataset=dataset, split=split, out_model=str(out), device="cpu",
                   engine=ENGINE, placement={})
    return checkpoint.load(out)


@pytest.mark.parametrize("kind", ["kdflow", "older-kdflow", "state_dict"])
def test_an_imported_teacher_says_what_was_and_was_not_checked(tmp_path, small_data, kind):
    _, _, norm, _ = small_data
    src = tmp_path / "t.pt"
    if kind == "state_dict":
        torch.save(build_model("resnet8").state_dict(), src)
    else:
        kdflow_file(src, model="resnet8", normalisation=norm if kind == "kdflow" else None)
    teacher = import_into(tmp_path, small_data, src, model="resnet8")
    source = teacher["source"]
    assert source["md5"] == md5(src) and source["kind"] == kind.removeprefix("older-")
    assert {"kdflow": (["architecture", "class count", "class names", "image size",
                        "normalisation"], []),
            "older-kdflow": (["architecture", "class count", "image size"],
                             ["class names and order (an older kdflow checkpoint records none)",
                              "normalisation (an older kdflow checkpoint records none)"]),
            "state_dict": (["architecture", "class count"],
                           ["class names and order (a plain state dict has none)",
                            "image size (resnet8's weights fit any size)",
                            "normalisation (a plain state dict records none)"]),
            }[kind] == (source["checked"], source["unchecked"])
    # What it was imported for, as a checkpoint trained here records it.
    assert teacher["classes"] == CLASSES and teacher["image_size"] == 32
    assert teacher["normalisation"] == norm


@pytest.mark.parametrize("change,needle", [
    ({"classes": CLASSES[:9] + ["tiger"]},
     r"trained on other classes than this dataset's \(same count, 10\): only in the file: "
     r"'tiger'; only in the data: 'truck'; its logits would mean other classes"),
    ({"classes": CLASSES[1:] + CLASSES[:1]},
     r"the same names in another order \(class 0 is 'automobile' there, 'airplane' here\)"),
    ({"normalisation": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
     r"trained on inputs normalised with mean \(0.485, 0.456, 0.406\) std \(0.229, 0.224, "
     r"0.225\), this dataset's are normalised with mean \(.*: it would see every image "
     r"shifted"),
], ids=["class-names", "class-order", "normalisation"])
def test_an_imported_teacher_for_other_classes_or_statistics_is_refused(tmp_path, small_data,
                                                                        change, needle):
    _, _, norm, _ = small_data
    src = kdflow_file(tmp_path / "t.pt", **{"normalisation": norm, **change})
    with pytest.raises(KdflowError, match=needle) as e:
        import_into(tmp_path, small_data, src)
    assert str(e.value).startswith(f"teacher.checkpoint {src.as_uri()}: ")
    assert len(str(e.value).splitlines()) == 1 and not (tmp_path / "model.pt").exists()


def test_a_nan_teacher_is_refused_before_it_is_measured(tmp_path, small_data):
    state = build_model("deepnn").state_dict()
    state["features.2.weight"][0, 0, 0, 0] = float("nan")
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}},
               tmp_path / "nan.pt")
    with pytest.raises(KdflowError, match=r"nan.pt holds weights that are not finite: 1 of its "
                                          r"12 tensors has NaN or inf values \(the first: "
                                          r"features.2.weight\)") as e:
        import_into(tmp_path, small_data, tmp_path / "nan.pt")
    assert len(str(e.value).splitlines()) == 1 and not (tmp_path / "model.pt").exists()


def test_fine_tuning_from_other_class_names_starts_a_fresh_head(tmp_path, small_data, caplog):
    dataset, split, norm, arm = small_data
    src = kdflow_file(tmp_path / "t.pt", classes=CLASSES[:9] + ["tiger"],
                      normalisation={"mean": [0.5] * 3, "std": [0.25] * 3})
    out = tmp_path / "tuned"
    with caplog.at_level(logging.INFO, logger="kdflow"):
        train(arm, dataset=dataset, split=split, out_model=str(out / "model.pt"),
              out_history=str(out / "history.csv"), seed=0, device="cpu", engine=ENGINE,
              threads=1, placement={}, init=str(src), init_record={"url": str(src), "md5": md5(src)})
    assert "classifier head classifier.3 replaced (10 classes there, 10 here, other names)" \
        in caplog.text
    assert "differs from the data in normalisation: mean (0.5, 0.5, 0.5)" in caplog.text
    tuned = checkpoint.load(out / "model.pt")
    init = tuned["init"]
    assert init["head_replaced"] and init["md5"] == md5(src) and init["kind"] == "kdflow"
    assert init["checked"] == ["architecture", "class count", "class names", "image size",
                               "normalisation"]
    assert init["unchecked"] == []
    assert init["notes"][0] == "class names: only in the file: 'tiger'; only in the data: 'truck'"
    assert init["notes"][1].startswith("normalisation: mean (0.5, 0.5, 0.5) std (0.25, 0.25, "
                                       "0.25) there, mean (")
    assert tuned["classes"] == CLASSES and tuned["normalisation"] == norm


# A run whose teacher is a plain state dict, imported (one seed, no export).

@pytest.fixture(scope="module")
def plain_import_run(tmp_path_factory, tiny_archive):
    workdir = tmp_path_factory.mktemp("plain-import")
    src = tmp_path_factory.mktemp("plain-teacher") / "deepnn.pt"
    torch.manual_seed(0)
    torch.save(build_model("deepnn").state_dict(), src)
    config = imported_config(tiny_archive, src, seeds=(0,))
    snakemake(workdir, config)
    return workdir, config


def test_teacher_keys_an_import_does_not_use_and_md5_case_rerun_nothing(plain_import_run):
    workdir, config = plain_import_run
    ref = config["teacher"]["checkpoint"]
    changed = deep_update(config, {
        "teacher": {"epochs": 7, "batch_size": 64, "lr": 0.05, "optimizer": "sgd",
                    "momentum": 0.5, "weight_decay": 1e-4, "lr_milestones": [2],
                    "lr_gamma": 0.5, "augment": {"crop": 4, "flip": True},
                    "checkpoint": {"md5": ref["md5"].upper()}},
        "data": {"md5": config["data"]["md5"].upper()}})
    assert planned_jobs(workdir, changed, targets=("results/summary/headline.json",)) == {}
    # Nor the report: it shows only the teacher keys an import uses.
    assert planned_jobs(workdir, changed) == {}
    # What the import does use reruns it, and everything after it.
    other = planned_jobs(workdir, deep_update(config, {"teacher": {"model": "resnet8"}}))
    assert other["import_teacher"] == 1 and other["train_student_kd"] == 1
    teacher = checkpoint.load(workdir / "results/teacher/model.pt")
    assert teacher["plan"]["training"] == {"model": "deepnn"}
    assert teacher["source"]["checked"] == ["architecture", "class count",
                                            "image size (deepnn's weights fit 32 to 35 alike)"]
    assert teacher["source"]["unchecked"] == [
        "class names and order (a plain state dict has none)",
        "normalisation (a plain state dict records none)"]
    # The aggregate read the teacher's row from that plan record.
    import pandas as pd
    metrics = pd.read_csv(workdir / "results/summary/metrics.csv")
    assert list(metrics.loc[metrics["arm"] == "teacher", "role"]) == ["teacher"]
