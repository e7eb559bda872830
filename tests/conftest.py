"""Shared fixtures: tiny CIFAR-10/100-format archives and a real workflow run.

The archives are built here, in the official layouts (cifar-10-batches-py/
data_batch_1..5, test_batch, batches.meta; cifar-100-python/train, test,
meta; all pickled dicts), from synthetic
images whose colour depends on the class, so models can learn something in
one epoch. The workflow is run for real through Snakemake on it.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
# Snakemake loads every installed executor plugin at start; the SLURM plugin
# then asks `scontrol show config` for MinJobAge, which where SLURM's client
# tools are installed but no controller answers (CI, once the SLURM test's
# packages are in) waits ~10 s on every Snakemake start. Local runs never
# need the answer: tests run them with a stand-in scontrol that fails at once.
_SHIM = Path(tempfile.mkdtemp(prefix="kdflow-test-bin-"))
(_SHIM / "scontrol").write_text("#!/bin/sh\nexit 1\n")
(_SHIM / "scontrol").chmod(0o755)


def local_env() -> dict:
    """The environment for Snakemake runs that use no cluster."""
    return {**os.environ, "PATH": f"{_SHIM}{os.pathsep}{os.environ.get('PATH', '')}"}


CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]


def synthetic_images(n: int, rng: np.random.Generator,
                     k: int = 10) -> tuple[np.ndarray, list[int]]:
    """n images (N, 3072) uint8, class-balanced over k classes, colour and
    stripes by class."""
    labels = [i % k for i in range(n)]
    rng.shuffle(labels)
    base = np.linspace(40, 215, k)
    imgs = np.empty((n, 3, 32, 32), np.float32)
    for i, c in enumerate(labels):
        img = rng.normal(0, 30, (3, 32, 32))
        img[c % 3] += base[c]
        img[:, :: 2 + c % 4, :] += 40  # class-dependent stripes
        imgs[i] = img + 60
    return np.clip(imgs, 0, 255).astype(np.uint8).reshape(n, -1), labels


def _add(tar: tarfile.TarFile, name: str, payload: bytes,
         root: str = "cifar-10-batches-py") -> None:
    info = tarfile.TarInfo(f"{root}/{name}")
    info.size, info.mode = len(payload), 0o644
    tar.addfile(info, io.BytesIO(payload))


def build_archive(path: Path, n_train: int = 300, n_test: int = 100, seed: int = 0,
                  members: dict[str, bytes] | None = None) -> str:
    """Write a CIFAR-10 python archive at `path`; returns its md5.

    `members` replaces or adds raw members (for malicious-pickle tests).
    """
    rng = np.random.default_rng(seed)
    x, y = synthetic_images(n_train, rng)
    xt, yt = synthetic_images(n_test, rng)
    payloads = {"batches.meta": pickle.dumps(
        {b"label_names": [c.encode() for c in CLASSES],
         b"num_cases_per_batch": n_train // 5, b"num_vis": 3072}, protocol=4)}
    for i, idx in enumerate(np.array_split(np.arange(n_train), 5), 1):
        payloads[f"data_batch_{i}"] = pickle.dumps(
            {b"batch_label": f"training batch {i} of 5".encode(), b"data": x[idx],
             b"labels": [y[j] for j in idx],
             b"filenames": [f"img{j}.png".encode() for j in idx]}, protocol=4)
    payloads["test_batch"] = pickle.dumps(
        {b"batch_label": b"testing batch 1 of 1", b"data": xt, b"labels": yt,
         b"filenames": [f"t{j}.png".encode() for j in range(n_test)]}, protocol=4)
    payloads.update(members or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in payloads.items():
            _add(tar, name, payload)
    return hashlib.md5(path.read_bytes()).hexdigest()


def build_archive_100(path: Path, n_train: int = 400, n_test: int = 200,
                      seed: int = 0) -> str:
    """Write a CIFAR-100 python archive (fine and coarse labels) at `path`;
    returns its md5."""
    rng = np.random.default_rng(seed)
    x, y = synthetic_images(n_train, rng, k=100)
    xt, yt = synthetic_images(n_test, rng, k=100)
    fine = [f"class_{i:02d}".encode() for i in range(100)]
    coarse = [f"super_{i:02d}".encode() for i in range(20)]

    def batch(label, data, labels):
        return pickle.dumps({b"batch_label": label, b"data": data, b"fine_labels": labels,
                             b"coarse_labels": [c // 5 for c in labels],
                             b"filenames": [f"i{j}.png".encode() for j in range(len(labels))]},
                            protocol=4)

    payloads = {
        "meta": pickle.dumps({b"fine_label_names": fine, b"coarse_label_names": coarse},
                             protocol=4),
        "train": batch(b"training batch 1 of 1", x, y),
        "test": batch(b"testing batch 1 of 1", xt, yt),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in payloads.items():
            _add(tar, name, payload, root="cifar-100-python")
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_archive_100(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("archive100") / "cifar-100-python.tar.gz"
    return path, build_archive_100(path)


@pytest.fixture
def batch():
    """Student logits, teacher logits and labels for the loss tests."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 10, generator=g) * 3
    t = torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    return s, t, y


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz"
    return path, build_archive(path)


def base_config(archive: Path, md5: str) -> dict:
    """The test experiment: tiny data, 1 epoch, 2 seeds, small batches."""
    return {
        "data": {"url": archive.as_uri(), "md5": md5, "val_size": 50},
        "seeds": [0, 1],
        "device": "cpu",
        "engine": {"deterministic": True},
        "teacher": {"model": "deepnn", "epochs": 1, "batch_size": 32},
        "student": {"model": "lightnn", "epochs": 1, "batch_size": 32},
        "kd": {"temperature": 2.0, "soft_target_weight": 0.25},
        # Speed is measured for real, on few images: at the default batch of
        # 1,000 a teacher's speed test costs more than its training here.
        "speed": {"batch": 16, "latency_runs": 3, "throughput_runs": 1},
        # Export costs seconds per model: on in the shared workflow_run (its
        # tests check it), off in the other runs, which test other points.
        "export": {"enabled": False, **EXPORT_SMALL},
        "report": {"title": "kdflow test report"},
    }


# Export settings for tiny data: few calibration images and timed runs.
EXPORT_SMALL = {"calibration_images": 64, "batch": 8, "warmup": 1, "runs": 3, "rounds": 3}


def deep_update(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in change.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def snakemake(workdir: Path, config: dict, *args: str, name: str = "config.yaml",
              check: bool = True, env: dict | None = None,
              repo: Path = REPO) -> subprocess.CompletedProcess:
    """Run the repository's workflow (or that of a copy at `repo`) in
    `workdir` with `config` (a file there)."""
    cfg = workdir / name
    cfg.write_text(yaml.safe_dump(config))
    # Two one-thread jobs at a time: on tiny data a job is mostly Python
    # start-up, which a second core halves. Results do not depend on it
    # (deterministic kernels; every test run uses the same thread count).
    cmd = [SNAKEMAKE, "-s", str(repo / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(cfg), "--cores", "2", "--resources", "gpu=2",
           "--max-threads", "1", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env=env or local_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def planned_jobs(workdir: Path, config: dict, env: dict | None = None,
                 targets: tuple[str, ...] = (), repo: Path = REPO) -> dict[str, int]:
    """Jobs a dry run would execute (for `targets`, default all), as
    {rule: count}; {} when up to date."""
    proc = snakemake(workdir, config, "-n", "--quiet", "rules", "--", *targets,
                     name="dryrun.yaml", env=env, repo=repo)
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    jobs = dict((m[0], int(m[1])) for m in re.findall(r"^(\w+)\s+(\d+)$", table, re.M))
    jobs.pop("total", None)
    return jobs


@pytest.fixture(scope="session")
def workflow_run(tmp_path_factory, tiny_archive) -> tuple[Path, dict]:
    """The whole test experiment, run once for real; returns (workdir, config)."""
    workdir = tmp_path_factory.mktemp("workflow")
    config = deep_update(base_config(*tiny_archive), {"export": {"enabled": True}})
    snakemake(workdir, config)
    return workdir, config


def report_tables(summary: Path) -> dict[str, str]:
    """The report's inputs by the names rules/report.smk gives them, from a
    finished run's results/summary/."""
    tables = {p.stem: str(p) for p in summary.glob("*.csv") if p.stem != "latency_samples"}
    tables["gain"] = tables.pop("kd_gain")
    tables["headline"] = str(summary / "headline.json")
    if (summary / "ship.json").exists():
        tables["ship_verdict"] = str(summary / "ship.json")
    return tables
