"""GPU slots (kdflow.core.gpu) without a GPU: pretend GPUs, real locks, real jobs.

Unit tests of the slot logic, then the tiny workflow through Snakemake with
two pretend GPUs: each job appends when it took and released its slot to a
record file (KDFLOW_GPU_RECORD), from inside the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from kdflow import KdflowError
from kdflow.core import gpu
from kdflow.core import provenance
from tests.helpers.workflow import (REPO, base_config, deep_update, local_env, planned_jobs,
                                    snakemake)

# Variables of the machine running the tests that would change what the
# slot logic sees (a CI job inside SLURM, a GPU runner).
OUTSIDE = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "SLURM_JOB_ID", "SLURM_JOB_GPUS",
           gpu.PRETEND_ENV, gpu.RECORD_ENV, gpu.GPU_ENV, gpu.SLOT_ENV, gpu.CLUSTER_JOB_ENV)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OUTSIDE}
    return {**env, **extra}


# --------------------------------------------------------------------------
# Which GPUs, how many slots
# --------------------------------------------------------------------------


def test_visible_gpus_from_pretend_devices_narrowed_by_cuda_visible_devices():
    assert gpu.visible_gpus(clean_env(KDFLOW_PRETEND_GPUS="0,1")) == ["0", "1"]
    assert gpu.visible_gpus(clean_env(KDFLOW_PRETEND_GPUS="")) == []
    four = clean_env(KDFLOW_PRETEND_GPUS="0,1,2,3")
    # An existing CUDA_VISIBLE_DEVICES names the physical GPUs to use.
    assert gpu.visible_gpus({**four, "CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert gpu.visible_gpus({**four, "CUDA_VISIBLE_DEVICES": "3, 1"}) == ["3", "1"]
    uuid = "GPU-8d2f0a6c-1b1e-4c3d-9b0e-3f6a5d1e2c4b"
    assert gpu.visible_gpus({**four, "CUDA_VISIBLE_DEVICES": uuid}) == [uuid]
    # As CUDA reads it: the list ends at the first invalid entry.
    assert gpu.visible_gpus({**four, "CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]
    assert gpu.visible_gpus({**four, "CUDA_VISIBLE_DEVICES": ""}) == []
    # No GPU on the machine: CUDA_VISIBLE_DEVICES alone makes none.
    assert gpu.visible_gpus(clean_env(KDFLOW_PRETEND_GPUS="", CUDA_VISIBLE_DEVICES="0")) == []


def test_without_pretend_devices_nvidia_smi_is_asked(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-aaaa)'\n"
                    "echo 'GPU 1: NVIDIA H200 (UUID: GPU-bbbb)'\n"
                    "echo '  MIG 3g.71gb     Device  0: (UUID: MIG-cccc)'\n"
                    "echo '  MIG 3g.71gb     Device  1: (UUID: MIG-dddd)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    # GPU 1 is partitioned: its MIG instances are the devices.
    assert gpu.visible_gpus(clean_env()) == ["0", "MIG-cccc", "MIG-dddd"]
    fake.unlink()
    assert gpu.visible_gpus(clean_env()) == []  # no driver, no GPU


def test_slots_are_gpus_times_jobs_per_gpu_one_per_gpu_first():
    assert gpu.slots(["0", "1"], 1) == [("0", 0), ("1", 0)]
    assert gpu.slots(["0", "1"], 2) == [("0", 0), ("1", 0), ("0", 1), ("1", 1)]
    assert len(gpu.slots(["0", "1", "2"], 3)) == 9


def test_every_slot_taken_once_then_a_released_one_again(tmp_path):
    envs, held = [], []
    for _ in range(4):
        env = clean_env(KDFLOW_PRETEND_GPUS="0,1")
        held.append(gpu.acquire("auto", jobs_per_gpu=2, lock_dir=str(tmp_path), env=env))
        envs.append(env)
    assert [s.index for s in held] == [0, 1, 2, 3]
    assert [s.gpu for s in held] == ["0", "1", "0", "1"]
    for env, s in zip(envs, held):
        # The job sees its slot's GPU alone, as cuda:0.
        assert env["CUDA_VISIBLE_DEVICES"] == env[gpu.GPU_ENV] == s.gpu
        assert env[gpu.SLOT_ENV] == str(s.index)
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # as nvidia-smi numbers them
    # All four lock files are held (flock: even against this same process).
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu-0-0.lock", "gpu-0-1.lock", "gpu-1-0.lock", "gpu-1-1.lock"]
    assert all(gpu._try_lock(s.path) is None for s in held)
    held[1].release()
    again = gpu.acquire("auto", jobs_per_gpu=2, lock_dir=str(tmp_path),
                        env=clean_env(KDFLOW_PRETEND_GPUS="0,1"))
    assert (again.index, again.gpu) == (1, "1")
    for s in (again, held[0], held[2], held[3]):
        s.release()


def test_cuda_visible_devices_of_the_run_is_respected(tmp_path):
    env = clean_env(KDFLOW_PRETEND_GPUS="0,1,2,3", CUDA_VISIBLE_DEVICES="3,1")
    first = gpu.acquire("cuda", lock_dir=str(tmp_path), env=env)
    env2 = clean_env(KDFLOW_PRETEND_GPUS="0,1,2,3", CUDA_VISIBLE_DEVICES="3,1")
    second = gpu.acquire("auto", lock_dir=str(tmp_path), env=env2)
    assert (first.gpu, second.gpu) == ("3", "1")
    assert (env["CUDA_VISIBLE_DEVICES"], env2["CUDA_VISIBLE_DEVICES"]) == ("3", "1")
    # The user's ids keep the user's CUDA device order.
    assert "CUDA_DEVICE_ORDER" not in env
    first.release()
    second.release()


@pytest.mark.parametrize("device,extra", [
    ("auto", {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "0",     # SLURM chose, for
              gpu.CLUSTER_JOB_ENV: "1"}),                            # the SLURM executor's job
    ("auto", {"KDFLOW_PRETEND_GPUS": ""}),                           # no GPU
    ("cpu", {}),                                                     # the CPU asked for
    ("cuda:1", {}),                                                  # a GPU named
])
def test_no_slot_where_none_applies(tmp_path, device, extra):
    env = clean_env(**{"KDFLOW_PRETEND_GPUS": "0,1", **extra})
    before = dict(env)
    assert gpu.acquire(device, lock_dir=str(tmp_path / "locks"), env=env) is None
    assert env == before  # CUDA_VISIBLE_DEVICES untouched
    assert not (tmp_path / "locks").exists()


def test_a_local_run_inside_a_slurm_allocation_shares_its_gpus_through_slots(tmp_path):
    # `salloc --gpus=2` (or `snakemake` in an sbatch script) on a 4-GPU node:
    # SLURM_JOB_ID is set, CUDA_VISIBLE_DEVICES names the allocation's GPUs,
    # and the jobs are the local executor's, not the SLURM executor's.
    def inside(**extra):
        return clean_env(KDFLOW_PRETEND_GPUS="0,1,2,3", SLURM_JOB_ID="42",
                         CUDA_VISIBLE_DEVICES="1,3", **extra)

    envs = [inside(), inside(**{gpu.CLUSTER_JOB_ENV: ""})]
    held = [gpu.acquire("auto", lock_dir=str(tmp_path), env=env) for env in envs]
    assert [s.gpu for s in held] == ["1", "3"]                  # not all on cuda:0
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == ["1", "3"]
    # The allocation's locks are its own (a shared filesystem's lock
    # directory is seen from other nodes, whose GPU 1 is another).
    assert {Path(s.path).parent.name for s in held} == {"slurm-job-42"}
    assert all(gpu._try_lock(s.path) is None for s in held)
    for s in held:
        s.release()
    # The same allocation's job submitted by the SLURM executor takes none.
    job = inside(**{gpu.CLUSTER_JOB_ENV: "1"})
    assert gpu.acquire("auto", lock_dir=str(tmp_path / "x"), env=job) is None
    assert job["CUDA_VISIBLE_DEVICES"] == "1,3" and not (tmp_path / "x").exists()


def test_slurm_job_gpus_narrows_the_machines_gpus_where_it_names_them():
    alloc = clean_env(KDFLOW_PRETEND_GPUS="0,1,2,3", SLURM_JOB_ID="42", SLURM_JOB_GPUS="1,3")
    assert gpu.visible_gpus(alloc) == ["1", "3"]
    # CUDA_VISIBLE_DEVICES, where SLURM set it, is what CUDA reads: it wins.
    assert gpu.visible_gpus({**alloc, "CUDA_VISIBLE_DEVICES": "2"}) == ["2"]
    # A node that hides the other GPUs (device cgroup) shows its own as 0, 1.
    assert gpu.visible_gpus({**alloc, "KDFLOW_PRETEND_GPUS": "0,1"}) == ["0", "1"]
    # Outside an allocation a stray SLURM_JOB_GPUS means nothing.
    assert gpu.visible_gpus({k: v for k, v in alloc.items() if k != "SLURM_JOB_ID"}) == \
        ["0", "1", "2", "3"]


def test_a_slot_taken_after_cuda_started_is_refused(tmp_path, monkeypatch):
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake)
    with pytest.raises(RuntimeError, match="before CUDA is initialised"):
        gpu.acquire("auto", lock_dir=str(tmp_path), env=clean_env(KDFLOW_PRETEND_GPUS="0"))


def test_an_unusable_lock_dir_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(KdflowError, match="gpu.lock_dir"):
        gpu.acquire("auto", lock_dir=str(tmp_path / "file" / "locks"),
                    env=clean_env(KDFLOW_PRETEND_GPUS="0"))


HOLDER = """
import sys, time
from kdflow.core import gpu
slot = gpu.acquire("auto", lock_dir=sys.argv[1], label=sys.argv[2])
print(slot.index, slot.gpu, flush=True)
time.sleep(120)
"""


def test_a_sigkilled_holders_slot_goes_to_the_job_waiting_for_it(tmp_path):
    env = clean_env(KDFLOW_PRETEND_GPUS="0", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-c", HOLDER, str(tmp_path / "locks")]
    holder = subprocess.Popen([*cmd, "holder"], env=env, stdout=subprocess.PIPE, text=True)
    waiter = None
    try:
        assert holder.stdout.readline().split() == ["0", "0"]
        waiter = subprocess.Popen([*cmd, "waiter"], env=env, stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert waiter.poll() is None and gpu._try_lock(
            str(tmp_path / "locks" / "gpu-0-0.lock")) is None  # one slot, held
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        killed = time.monotonic()
        # The kernel dropped the dead holder's lock; the waiter retries at
        # most every few seconds.
        assert waiter.stdout.readline().split() == ["0", "0"]
        assert time.monotonic() - killed < gpu.MAX_WAIT_STEP_S * 1.5 + 2
    finally:
        for p in (holder, waiter):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_provenance_names_the_gpu_of_the_slot(monkeypatch):
    monkeypatch.setenv(gpu.GPU_ENV, "1")
    monkeypatch.setenv(gpu.SLOT_ENV, "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    record = provenance.collect("cpu")
    assert (record["gpu"], record["gpu_slot"], record["cuda_visible_devices"]) == ("1", "3", "1")
    for key in OUTSIDE:
        monkeypatch.delenv(key, raising=False)
    assert provenance.collect("cpu")["gpu"] is None


# --------------------------------------------------------------------------
# The workflow with two pretend GPUs
# --------------------------------------------------------------------------

GPU_RULES_PER_SEED = 7  # teacher, its logits, 2 students, 3 evaluations
# Every GPU job of the seed, not the aggregate and report (seconds of CPU
# each, nothing to do with GPUs).
TARGETS = tuple(f"results/seed0/{arm}/metrics.json"
                for arm in ("teacher", "lightnn/ce", "lightnn/kd/T2_w0.25"))


def records(path: Path) -> list[dict]:
    """The complete lines so far (a job may be appending one)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def intervals(recs: list[dict], killed: dict[int, float] | None = None) -> list[dict]:
    """One {pid, label, slot, gpu, start, end} per job that held a slot; a
    killed job's slot ends when it was killed."""
    jobs = {}
    for r in recs:
        if r["event"] == "acquired":
            jobs[r["pid"]] = {**r, "start": r["time"], "end": (killed or {}).get(r["pid"])}
        else:
            jobs[r["pid"]]["end"] = r["time"]
    assert all(j["end"] is not None for j in jobs.values()), jobs
    return sorted(jobs.values(), key=lambda j: j["start"])


def overlapping(jobs: list[dict]) -> list[tuple[dict, dict]]:
    return [(a, b) for i, a in enumerate(jobs) for b in jobs[i + 1:]
            if a["start"] < b["end"] and b["start"] < a["end"]]


def most_at_once(jobs: list[dict], gpu_id: str) -> int:
    on = [j for j in jobs if j["gpu"] == gpu_id]
    return max((sum(1 for k in on if k["start"] <= j["start"] < k["end"]) for j in on),
               default=0)


@pytest.fixture(scope="module")
def slot_runs(tmp_path_factory, tiny_archive):
    """The tiny workflow (one seed, device auto) run twice on the pretend
    GPUs "0,1": with `--resources gpu=2` (and the teacher SIGKILLed once it
    holds its slot, then retried), then rerun from the teacher with
    gpu.jobs_per_gpu 2 and `--resources gpu=4`."""
    workdir = tmp_path_factory.mktemp("gpu_slots")
    config = deep_update(base_config(*tiny_archive), {"seeds": [0], "device": "auto"})
    first = workdir / "slots1.jsonl"
    env = {**{k: v for k, v in local_env().items() if k not in OUTSIDE},
           gpu.PRETEND_ENV: "0,1", gpu.RECORD_ENV: str(first)}

    result: dict = {}
    run = threading.Thread(target=lambda: result.update(proc=snakemake(
        workdir, config, "--cores", "4", "--resources", "gpu=2", "--retries", "1", "--", *TARGETS,
        env=env, check=False)))
    t0 = time.monotonic()
    run.start()
    killed = {}
    while run.is_alive() and not killed and time.monotonic() - t0 < 600:
        for r in records(first):
            if r["event"] == "acquired" and r["label"].endswith("teacher/train.log"):
                os.kill(r["pid"], signal.SIGKILL)  # fails if the job is gone: test error
                killed[r["pid"]] = time.time()
                break
        time.sleep(0.05)
    run.join()
    proc = result["proc"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert killed, "the teacher job was never seen holding a slot"
    run1_seconds = time.monotonic() - t0

    second = workdir / "slots2.jsonl"
    packed = deep_update(config, {"gpu": {"jobs_per_gpu": 2}})
    snakemake(workdir, packed, "--cores", "4", "--resources", "gpu=4",
              "--forcerun", "train_teacher", "--", *TARGETS,
              env={**env, gpu.RECORD_ENV: str(second)})
    return {"workdir": workdir, "config": config, "env": env, "killed": killed,
            "run1": records(first), "run2": records(second), "run1_seconds": run1_seconds}


def test_no_two_jobs_at_once_share_a_slot(slot_runs):
    jobs = intervals(slot_runs["run1"], slot_runs["killed"])
    # Every GPU job, plus the killed teacher's first attempt.
    assert len(jobs) == GPU_RULES_PER_SEED + 1
    assert {j["slot"] for j in jobs} <= {0, 1}
    pairs = overlapping(jobs)
    assert pairs, "no two jobs ever ran at once: nothing was tested"
    for a, b in pairs:
        assert a["slot"] != b["slot"], (a, b)
        assert a["gpu"] != b["gpu"], (a, b)  # one job per GPU


def test_each_job_saw_its_slots_gpu_before_cuda_started(slot_runs):
    for r in slot_runs["run1"] + slot_runs["run2"]:
        # Slot i is on pretend GPU i % 2, and the job itself saw that GPU
        # alone in CUDA_VISIBLE_DEVICES, set before CUDA was initialised
        # (at its slot's release too: nothing reset it).
        assert r["gpu"] == ["0", "1"][r["slot"] % 2], r
        assert r["cuda_visible_devices"] == r["gpu"], r
        assert r["cuda_initialized"] is False, r


def test_a_killed_jobs_slot_is_taken_by_the_next_job(slot_runs):
    (pid, when), = slot_runs["killed"].items()
    jobs = intervals(slot_runs["run1"], slot_runs["killed"])
    dead = next(j for j in jobs if j["pid"] == pid)
    after = [j for j in jobs if j["start"] > when]
    # The retried teacher is the only GPU job that can run next: it gets
    # the dead job's slot (slots are tried in order), not the other one.
    assert after[0]["label"] == dead["label"] and after[0]["slot"] == dead["slot"]
    assert after[0]["waited"] < 1.0


def test_log_and_checkpoint_name_the_physical_gpu(slot_runs):
    # The second run retrained the teacher: its log and checkpoint are that
    # run's.
    teacher = [j for j in intervals(slot_runs["run2"])
               if j["label"].endswith("teacher/train.log")][-1]
    log = (slot_runs["workdir"] / teacher["label"]).read_text()
    assert f"GPU slot {teacher['slot']} of 4: physical GPU {teacher['gpu']}" in log
    prov = torch.load(slot_runs["workdir"] / "results/seed0/teacher/model.pt",
                      weights_only=True)["provenance"]
    assert (prov["gpu"], prov["gpu_slot"]) == (teacher["gpu"], str(teacher["slot"]))


def test_jobs_per_gpu_2_puts_at_most_two_jobs_on_a_gpu(slot_runs):
    jobs = intervals(slot_runs["run2"])
    assert len(jobs) == GPU_RULES_PER_SEED
    assert {j["slot"] for j in jobs} <= {0, 1, 2, 3}
    for a, b in overlapping(jobs):
        assert a["slot"] != b["slot"], (a, b)
    peak = {g: most_at_once(jobs, g) for g in ("0", "1")}
    assert max(peak.values()) <= 2, peak
    # After the teacher, its logits, the plain student and the teacher's
    # evaluation start together: three jobs on two GPUs, two on one.
    assert max(peak.values()) == 2, peak


def test_moving_a_finished_run_to_other_gpus_reruns_nothing(slot_runs):
    workdir, config, env = slot_runs["workdir"], slot_runs["config"], slot_runs["env"]
    assert planned_jobs(workdir, config, env=env, targets=TARGETS) == {}
    for change in ({gpu.PRETEND_ENV: "1,0"}, {gpu.PRETEND_ENV: "0,1,2,3",
                                              "CUDA_VISIBLE_DEVICES": "3"},
                   {gpu.PRETEND_ENV: ""}):
        assert planned_jobs(workdir, config, env={**env, **change}, targets=TARGETS) == {}, \
            change
    for gpu_cfg in ({"jobs_per_gpu": 4}, {"lock_dir": str(workdir / "elsewhere")}):
        assert planned_jobs(workdir, deep_update(config, {"gpu": gpu_cfg}), env=env,
                            targets=TARGETS) == {}
    # The check can fail: a change of params (the device) does rerun the jobs.
    assert planned_jobs(workdir, {**config, "device": "cpu"}, env=env,
                        targets=TARGETS)["train_teacher"] == 1


# --------------------------------------------------------------------------
# Inside a SLURM allocation: a local run, or the SLURM executor's job
# --------------------------------------------------------------------------

EVALUATIONS = ("results/seed0/teacher/metrics.json", "results/seed0/lightnn/ce/metrics.json")


def in_allocation(slot_runs, record: Path) -> dict:
    """`salloc --gpus=2` on a node with pretend GPUs 0-3: SLURM gave GPUs
    1 and 3. KDFLOW_CLUSTER_JOB is inherited from somewhere, stale: the
    Snakefile decides it anew."""
    return {**slot_runs["env"], gpu.PRETEND_ENV: "0,1,2,3", "CUDA_VISIBLE_DEVICES": "1,3",
            "SLURM_JOB_ID": "42", gpu.CLUSTER_JOB_ENV: "1", gpu.RECORD_ENV: str(record)}


def test_a_local_run_inside_a_slurm_allocation_puts_its_jobs_on_the_allocations_gpus(
        slot_runs, tmp_path):
    workdir, record = slot_runs["workdir"], tmp_path / "slots.jsonl"
    snakemake(workdir, slot_runs["config"], "--resources", "gpu=2", "--forcerun", "evaluate",
              "--", *EVALUATIONS, env=in_allocation(slot_runs, record))
    jobs = intervals(records(record))
    # Both evaluations took a slot of the allocation's GPUs, saw that GPU
    # alone, and never shared one.
    assert sorted(j["label"] for j in jobs) == sorted(
        f"results/logs/seed0/{arm}/evaluate.log" for arm in ("lightnn/ce", "teacher"))
    for j in jobs:
        assert j["gpu"] in ("1", "3") and j["cuda_visible_devices"] == j["gpu"], j
    for a, b in overlapping(jobs):
        assert a["gpu"] != b["gpu"], (a, b)
    assert sorted(p.name for p in (workdir / ".snakemake/gpu-slots/slurm-job-42").iterdir()) \
        == ["gpu-1-0.lock", "gpu-3-0.lock"]
    log = (workdir / jobs[0]["label"]).read_text()
    assert "local run inside SLURM allocation 42: its jobs share its GPUs 1,3" in log


def test_a_job_of_the_slurm_executor_takes_no_slot(slot_runs, tmp_path):
    # The SLURM executor's job runs the rule in a Snakemake of mode remote
    # (sbatch, then srun: `--executor slurm-jobstep`, whose inner Snakemake
    # is called like this); SLURM gave it its GPU.
    workdir, record = slot_runs["workdir"], tmp_path / "slots.jsonl"
    snakemake(workdir, slot_runs["config"], "--target-jobs", "evaluate:seed=0,arm=teacher",
              "--allowed-rules", "evaluate", "--force", "--nolock", "--mode", "remote",
              env={**in_allocation(slot_runs, record), gpu.CLUSTER_JOB_ENV: "",
                   "CUDA_VISIBLE_DEVICES": "3"})
    assert not record.exists(), record.read_text()
    log = (workdir / "results/logs/seed0/teacher/evaluate.log").read_text()
    assert ("SLURM job 42, submitted by Snakemake's SLURM executor: using the GPUs SLURM "
            "gave it (CUDA_VISIBLE_DEVICES=3)") in log
