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

from tests.conftest import REPO, snakemake

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
    snakemake(tmp_path, config, "--workflow-profile", str(REPO / "profiles/slurm"),
              "--slurm-status-command", "squeue", "--jobs", "4", "--latency-wait", "5",
              # poll every few seconds, not the plugin's 40+ (a test cluster
              # answers at once; a real one prefers the default)
              "--slurm-init-seconds-before-status-checks", "2",
              # one thread per job, as the local run it is compared with
              "--set-threads", "train_teacher=1", "train_student_baseline=1",
              "train_student_kd=1", "teacher_logits=1", "evaluate=1",
              env=dict(os.environ))
    jobs = [j for j in slurm_jobs() if j["JobId"] not in before]
    rules = sorted(re.match(r"rule_(\w+?)_wildcards", j["Comment"]).group(1) for j in jobs)
    n = len(config["seeds"])
    assert rules == sorted(["evaluate"] * 3 * n + ["train_student_baseline"] * n
                           + ["train_student_kd"] * n + ["train_teacher"] * n
                           + ["teacher_logits"] * n)
    for j in jobs:
        assert j["JobState"] == "COMPLETED", j
        if j["Comment"].startswith(("rule_train", "rule_teacher_logits")):
            assert j.get("TresPerJob") == "gres:gpu:1", j
    # data, aggregate and report ran on the submitting host, not as jobs
    assert (tmp_path / "results/report.html").is_file()
    for seed in config["seeds"]:
        for arm in ARMS:
            rel = f"results/seed{seed}/{arm}/metrics.json"
            assert filecmp.cmp(tmp_path / rel, local_dir / rel, shallow=False), rel
