"""The workflow on a real (single-node) SLURM through the slurm profile.

tests/slurm/start.sh starts munged, slurmctld and slurmd from Debian's
slurm-wlm and munge packages (`make test` installs them as root) with one
pretend GPU; the daemons are stopped by their pids at the end. Where the
packages are missing the test is skipped and says why.
"""

import filecmp
import os
import re
import shutil
import subprocess

import pytest

from kdflow.core import gpu
from tests.helpers.workflow import REPO, deep_update, snakemake

SLURM_TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol")
ARMS = ("teacher", "lightnn/ce", "lightnn/kd/T2_w0.25")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [t for t in SLURM_TOOLS if not shutil.which(t)]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing; Debian packages "
                    "slurm-wlm and munge, which `make test` installs as root with apt-get)")
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(REPO / "tests/slurm/start.sh"), str(state)],
                           capture_output=True, text=True, timeout=120)
    try:
        if start.returncode != 0:
            pytest.fail(f"could not start SLURM:\n{start.stdout}\n{start.stderr}")
        yield state
    finally:
        subprocess.run(["bash", str(REPO / "tests/slurm/stop.sh"), str(state)], timeout=60)


def slurm_jobs() -> list[dict]:
    out = subprocess.run(["scontrol", "show", "jobs", "-o"], capture_output=True,
                         text=True, check=True).stdout
    # one line per job; "No jobs in the system" when there are none
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines()
            if line.startswith("JobId=")]


def test_workflow_runs_through_sbatch_with_gpus(slurm, workflow_run, tmp_path):
    local_dir, config = workflow_run
    before = {j["JobId"] for j in slurm_jobs()}
    # device auto and a pretend GPU: under SLURM kdflow.core.gpu must take no slot
    # (SLURM chose the GPUs); auto still means the CPU here, so the metrics
    # equal the local run's.
    record = tmp_path / "slots.jsonl"
    # Without export: its CPU jobs would join the groups checked below
    # (profiles/slurm puts them there), which this test sizes for training.
    snakemake(tmp_path, deep_update(config, {"device": "auto", "export": {"enabled": False}}),
              "--workflow-profile", str(REPO / "profiles/slurm"),
              "--slurm-status-command", "squeue", "--jobs", "4", "--latency-wait", "5",
              # poll every few seconds, not the plugin's 40+ (a test cluster
              # answers at once; a real one prefers the default)
              "--slurm-init-seconds-before-status-checks", "2",
              # the profile's cap of one GPU per group job (conftest's
              # snakemake() passes gpu=2, meant for local runs)
              "--resources", "gpu=1",
              # one thread per job, as the local run it is compared with
              "--set-threads", "train_teacher=1", "train_student_baseline=1",
              "train_student_kd=1", "teacher_logits=1", "evaluate=1",
              env={**os.environ, gpu.PRETEND_ENV: "0", gpu.RECORD_ENV: str(record)})
    jobs = [j for j in slurm_jobs() if j["JobId"] not in before]
    n = len(config["seeds"])
    # One sbatch per teacher and per teacher's logits, and one grouped job per
    # seed for its students and all its evaluations (profiles/slurm: up to 4
    # components a group; here 3: the teacher's evaluation, and each student
    # with its evaluation). Ungrouped it was 7 per seed (14 here).
    names = sorted(re.match(r"rule_(train_teacher|teacher_logits|students\d+)_",
                            j["Comment"]).group(1) for j in jobs)
    assert names == sorted(["train_teacher"] * n + ["teacher_logits"] * n
                           + [f"students{seed}" for seed in config["seeds"]])
    assert len(jobs) == 3 * n
    for j in jobs:
        assert j["JobState"] == "COMPLETED", j
        assert j.get("TresPerJob") == "gres:gpu:1", j  # groups too: one GPU each
        if j["Comment"].startswith("rule_students"):
            # A group's members run one after another on its GPU: it asks
            # the sum of their runtimes (2 trainings x 60 + 3 evaluations x
            # 20 min), the largest memory and thread count, not their sums.
            assert j["Comment"].endswith("_evaluate_train_student_baseline_train_student_kd"), j
            assert (j["TimeLimit"], j["MinMemoryNode"], j["NumCPUs"]) == \
                ("03:00:00", "8000M", "1"), j
    # data, aggregate and report ran on the submitting host, not as jobs
    assert (tmp_path / "results/report.html").is_file()
    # No job took a GPU slot, and the grouped ones said why.
    assert not record.exists(), record.read_text()
    log = (tmp_path / "results/logs/seed0/lightnn/ce/train.log").read_text()
    assert "SLURM job" in log and "using the GPUs SLURM gave it" in log
    for seed in config["seeds"]:
        for arm in ARMS:
            rel = f"results/seed{seed}/{arm}/metrics.json"
            assert filecmp.cmp(tmp_path / rel, local_dir / rel, shallow=False), rel
