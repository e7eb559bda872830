"""Shared fixtures: tiny CIFAR-10/100-format archives and a real workflow run.

The archives come from tests.helpers.archives, in the official layouts, from
synthetic images whose colour depends on the class, so models can learn
something in one epoch. The workflow is run for real through Snakemake on
them (tests.helpers.workflow).

Fixtures live here; the helpers test modules call live in tests/helpers/.
The helpers' names stay importable from tests.conftest for the modules that
still import them from here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.archives import CLASSES, build_archive, build_archive_100, synthetic_images
from tests.helpers.workflow import (EXPORT_SMALL, REPO, SNAKEMAKE, base_config, deep_update,
                                    local_env, planned_jobs, report_tables, snakemake)

# Re-exported: test modules that import these from tests.conftest (rather
# than tests.helpers) keep working until they switch.
__all__ = ["CLASSES", "EXPORT_SMALL", "REPO", "SNAKEMAKE", "base_config", "build_archive",
           "build_archive_100", "deep_update", "local_env", "planned_jobs", "report_tables",
           "snakemake", "synthetic_images"]


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


@pytest.fixture(scope="session")
def workflow_run(tmp_path_factory, tiny_archive) -> tuple[Path, dict]:
    """The whole test experiment, run once for real; returns (workdir, config)."""
    workdir = tmp_path_factory.mktemp("workflow")
    config = deep_update(base_config(*tiny_archive), {"export": {"enabled": True}})
    snakemake(workdir, config)
    return workdir, config


@pytest.fixture(scope="session")
def chance_run(tmp_path_factory, tiny_archive) -> tuple[Path, dict]:
    """A teacher that cannot learn (Adam at lr 1e-30: its weights never move,
    so it predicts one class) and its students, one seed, run for real once:
    tests/test_diverged_runs.py and tests/test_provenance.py share it.
    Returns (workdir, config)."""
    workdir = tmp_path_factory.mktemp("chance")
    config = deep_update(base_config(*tiny_archive), {"seeds": [0], "teacher": {"lr": 1e-30}})
    snakemake(workdir, config)
    return workdir, config
