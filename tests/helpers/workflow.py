"""Running the repository's workflow for real: the test experiment's config,
Snakemake runs and dry runs, and what a finished run's report reads."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
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


def report_tables(summary: Path) -> dict[str, str]:
    """The report's inputs by the names rules/report.smk gives them, from a
    finished run's results/summary/."""
    tables = {p.stem: str(p) for p in summary.glob("*.csv") if p.stem != "latency_samples"}
    tables["gain"] = tables.pop("kd_gain")
    tables["headline"] = str(summary / "headline.json")
    if (summary / "ship.json").exists():
        tables["ship_verdict"] = str(summary / "ship.json")
    return tables
