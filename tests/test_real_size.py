"""The workflow at a practitioner's size: 224-pixel images, a torchvision
teacher and student, images streamed from disk, every job's memory capped."""

from __future__ import annotations

import csv
import json

import pytest

from kdflow.models import checkpoint
from tests.conftest import base_config, planned_jobs, snakemake
from tests.helpers.hostile import make_tree

# A job's peak resident memory at 224 px, what a laptop or a shared node
# leaves one job: the model, its activations and the batches in flight.
MAX_JOB_RSS_MB = 2500


@pytest.fixture(scope="module")
def run_224(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_size")
    # 240x240 photos trained at 224: a resize on the way, as with real data.
    tree = make_tree(root / "tree", train=4, test=2, size=240, fmt="JPEG")
    workdir = root / "run"
    workdir.mkdir()
    config = base_config(tree, "")
    config["data"] = {"dataset": "folder", "url": str(tree), "val_size": 10,
                      "image_size": 224}
    config["seeds"] = [0]
    config["teacher"] = {"model": "resnet18", "epochs": 1, "batch_size": 16}
    config["student"] = {"model": "mobilenet_v3_small", "epochs": 1, "batch_size": 16}
    # Forced: tiny data would be resident under auto.
    config["placement"] = {"images": "streamed"}
    snakemake(workdir, config)
    return workdir, config


def test_224_pixel_run_streams_its_images_and_keeps_every_job_small(run_224):
    workdir, _ = run_224
    res = workdir / "results"
    teacher = checkpoint.load(res / "teacher" / "model.pt" if (res / "teacher").is_dir()
                              else res / "seed0" / "teacher" / "model.pt")
    assert teacher["image_size"] == 224 and teacher["model"] == "resnet18"
    metrics = json.loads(next(res.glob("**/mobilenet_v3_small/kd/*/metrics.json")).read_text())
    assert metrics["test_images"] == 20 and metrics["model"] == "mobilenet_v3_small"
    logs = {p.relative_to(res / "logs"): p.read_text() for p in (res / "logs").rglob("*.log")}
    trained = [k for k, text in logs.items() if k.name == "train.log"]
    assert len(trained) == 3, sorted(logs)       # teacher, plain and distilled student
    for name in trained:
        assert "images read per batch from" in logs[name] and "(placement.images)" in logs[name]
    # Snakemake's benchmark of every job that declares one: its peak RSS.
    peaks = {}
    for tsv in (res / "benchmarks").rglob("*.tsv"):
        with open(tsv) as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        peaks[str(tsv.relative_to(res))] = float(row["max_rss"])
    assert any("train" in k for k in peaks) and any("evaluate" in k or "eval" in k
                                                   for k in peaks), peaks
    assert max(peaks.values()) < MAX_JOB_RSS_MB, peaks


def test_where_the_images_are_held_reruns_nothing(run_224):
    workdir, config = run_224
    for images in ("resident", "auto"):
        assert planned_jobs(workdir, {**config, "placement": {"images": images}}) == {}
