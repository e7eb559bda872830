"""GPU slots: which GPU a training or evaluation job runs on.

Snakemake counts GPUs (`--resources gpu=4` lets four jobs that declare gpu=1
run at once) but never assigns them: all four would train on cuda:0. So each
such job takes a *slot* first: a non-blocking `flock` on one lock file per
slot, trying the slots in order and waiting with backoff while all are
taken. A slot belongs to one physical GPU; the job then sets
CUDA_VISIBLE_DEVICES to that GPU alone and trains on cuda:0. Slots are the
GPUs visible to the run times `gpu.jobs_per_gpu` (several small students can
share a GPU).

- The kernel releases a flock when its holder dies, however it dies: a
  killed job never keeps a GPU from the next one. (A child forked without
  exec would inherit the lock; kdflow forks none.)
- CUDA reads CUDA_VISIBLE_DEVICES once, when it initialises: the slot must be
  taken before the first CUDA call. This module never imports torch.
- The GPU is chosen at run time from the environment, never from a rule's
  params, so moving a job to another GPU never reruns it.
- Nothing happens on the CPU (device cpu, or no GPU at all), with an
  explicit cuda:N device (the user chose the GPU), and in a job that
  Snakemake's SLURM executor submitted: SLURM gave that job its GPU, and its
  CUDA_VISIBLE_DEVICES already names it. The Snakefile tells such a job
  (CLUSTER_JOB_ENV: its Snakemake runs in mode "remote", as every job of a
  cluster executor does) from a local run inside an allocation (`salloc`, or
  `snakemake` in an `sbatch` script: SLURM_JOB_ID is set there too), whose
  jobs share the allocation's GPUs through slots like on any machine. The
  lock files of an allocation's slots go to a subdirectory of their own
  (`slurm-job-ID`): a lock directory on a shared filesystem is seen by other
  nodes, whose GPU 0 is not this node's.

Tests and machines without GPUs can name pretend GPUs in KDFLOW_PRETEND_GPUS
(e.g. "0,1"); KDFLOW_GPU_RECORD names a file to which each job appends when
it took and released its slot (JSON lines), for the tests to check.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Optional

from kdflow import KdflowError

log = logging.getLogger(__name__)

PRETEND_ENV = "KDFLOW_PRETEND_GPUS"
RECORD_ENV = "KDFLOW_GPU_RECORD"
# Set for the job once it holds a slot; provenance records them.
GPU_ENV = "KDFLOW_GPU"
SLOT_ENV = "KDFLOW_GPU_SLOT"
# "1" in a job that a cluster executor submitted (set by the Snakefile).
CLUSTER_JOB_ENV = "KDFLOW_CLUSTER_JOB"
# gpu.lock_dir "" (the schema's default): under the run's working directory,
# next to Snakemake's own state, so runs of different checkouts never wait
# for each other's slots.
DEFAULT_LOCK_DIR = os.path.join(".snakemake", "gpu-slots")
# Backoff while every slot is taken: first retry soon (a job may be just
# ending), then no more often than this.
MAX_WAIT_STEP_S = 5.0

_CVD_ENTRY = re.compile(r"^(\d+|GPU-[0-9A-Za-z-]+|MIG-[0-9A-Za-z/-]+)$")


@dataclass
class Slot:
    """A held slot. The lock lives as long as `fd` is open (at the latest
    until the process ends)."""

    index: int          # 0-based, in the order slots are tried
    count: int          # slots in all
    gpu: str            # the physical GPU, as CUDA_VISIBLE_DEVICES names it
    path: str           # the lock file
    fd: int
    label: str = ""

    def release(self) -> None:
        if self.fd < 0:
            return
        _record("released", self)
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = -1


def _parse_visible(value: str) -> list[str]:
    """CUDA_VISIBLE_DEVICES as CUDA reads it: ids (indices, GPU-/MIG- UUIDs)
    up to the first invalid entry ("", "-1" or "NoDevFiles" hide every GPU)."""
    ids = []
    for entry in value.split(","):
        entry = entry.strip()
        if not _CVD_ENTRY.match(entry):
            break
        ids.append(entry)
    return ids


def _nvidia_smi_gpus() -> list[str]:
    """The machine's GPUs by `nvidia-smi -L`, without initialising CUDA:
    indices, or the MIG instances' UUIDs where a GPU is partitioned."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []  # no driver, no GPU
    if out.returncode != 0:
        return []
    gpus: list[str] = []
    for line in out.stdout.splitlines():
        gpu = re.match(r"^GPU (\d+):", line)
        mig = re.search(r"\(UUID: (MIG-[^)\s]+)\)", line)
        if gpu:
            gpus.append(gpu.group(1))
        elif mig and gpus:
            # A partitioned GPU is used through its MIG instances.
            if not gpus[-1].startswith("MIG-"):
                gpus.pop()
            gpus.append(mig.group(1))
    return gpus


def visible_gpus(env: Mapping[str, str] = os.environ) -> list[str]:
    """The GPUs this run may use, as ids for CUDA_VISIBLE_DEVICES.

    The machine's GPUs are those in KDFLOW_PRETEND_GPUS when set, else those
    nvidia-smi lists; none means none. An existing CUDA_VISIBLE_DEVICES
    narrows them: its entries are the ids the slots use (SLURM sets it in
    an allocation's batch script and job steps). Without it, inside a SLURM
    allocation, SLURM_JOB_GPUS (the allocation's GPUs, by the machine's
    numbers) narrows them where it names GPUs the machine lists; where it
    does not, the node's device cgroup hides the other GPUs and numbers the
    allocation's from 0, so all the machine lists are the allocation's.
    """
    pretend = env.get(PRETEND_ENV)
    machine = _parse_visible(pretend) if pretend is not None else _nvidia_smi_gpus()
    if not machine:
        return []
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return _parse_visible(visible)
    allocated = _parse_visible(env.get("SLURM_JOB_GPUS", "")) if env.get("SLURM_JOB_ID") else []
    return allocated if allocated and set(allocated) <= set(machine) else machine


def slots(gpus: list[str], jobs_per_gpu: int) -> list[tuple[str, int]]:
    """(GPU, share) of every slot, in the order they are tried: one job on
    each GPU before a second one on any."""
    return [(gpu, share) for share in range(jobs_per_gpu) for gpu in gpus]


def _lock_name(gpu: str, share: int) -> str:
    # Named by the physical GPU, not by slot number: runs that share a lock
    # directory with another CUDA_VISIBLE_DEVICES order still meet on it.
    return f"gpu-{re.sub(r'[^0-9A-Za-z-]', '_', gpu)}-{share}.lock"


def _try_lock(path: str) -> Optional[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by exec'd children
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def _record(event: str, slot: Slot, **extra) -> None:
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    line = json.dumps({
        "event": event, "time": time.time(), "pid": os.getpid(), "label": slot.label,
        "slot": slot.index, "gpu": slot.gpu,
        # As this process sees them, from inside the job.
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_initialized": _cuda_initialized(),
        **extra})
    # One write of one line to a file opened for appending: lines of
    # concurrent jobs never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")  # never imported here
    return bool(torch is not None and torch.cuda.is_initialized())


def acquire(device: str, jobs_per_gpu: int = 1, lock_dir: str = "", label: str = "",
            env: Optional[dict] = None) -> Optional[Slot]:
    """Take a GPU slot for a job on `device` (the config's) and point
    CUDA_VISIBLE_DEVICES at its GPU; None where no slot applies (see the
    module's docstring). Waits while every slot is taken.

    `env` (default os.environ) is read for the GPUs and receives
    CUDA_VISIBLE_DEVICES, KDFLOW_GPU and KDFLOW_GPU_SLOT.
    """
    env = os.environ if env is None else env
    if device == "cpu":
        return None
    if device.startswith("cuda:"):
        log.info("device %s names its GPU: no GPU slot taken", device)
        return None
    allocation = env.get("SLURM_JOB_ID")
    if allocation and env.get(CLUSTER_JOB_ENV) == "1":
        log.info("SLURM job %s, submitted by Snakemake's SLURM executor: using the GPUs "
                 "SLURM gave it (CUDA_VISIBLE_DEVICES=%s)",
                 allocation, env.get("CUDA_VISIBLE_DEVICES"))
        return None
    gpus = visible_gpus(env)
    if not gpus:
        return None
    if allocation:
        log.info("local run inside SLURM allocation %s: its jobs share its GPUs %s "
                 "through GPU slots", allocation, ",".join(gpus))
    if _cuda_initialized():
        # Too late: CUDA has read CUDA_VISIBLE_DEVICES already.
        raise RuntimeError("kdflow.core.gpu.acquire must run before CUDA is initialised")
    if jobs_per_gpu < 1:
        raise KdflowError(f"gpu.jobs_per_gpu is {jobs_per_gpu}; it must be 1 or more")
    lock_dir = os.path.abspath(lock_dir or DEFAULT_LOCK_DIR)
    if allocation:
        lock_dir = os.path.join(lock_dir, f"slurm-job-{re.sub(r'[^0-9A-Za-z_-]', '_', allocation)}")
    try:
        os.makedirs(lock_dir, exist_ok=True)
    except OSError as e:
        raise KdflowError(
            f"cannot create the GPU slot directory {lock_dir} ({e.strerror}); set "
            "gpu.lock_dir in the config to a writable directory") from None
    order = slots(gpus, jobs_per_gpu)
    start, step, told = time.monotonic(), 0.05, False
    while True:
        for index, (gpu, share) in enumerate(order):
            path = os.path.join(lock_dir, _lock_name(gpu, share))
            try:
                fd = _try_lock(path)
            except OSError as e:
                raise KdflowError(
                    f"cannot lock {path} ({e.strerror}); set gpu.lock_dir in the config "
                    "to a writable local directory") from None
            if fd is not None:
                return _hold(Slot(index, len(order), gpu, path, fd, label), env,
                             time.monotonic() - start)
        if not told:
            log.info("all %d GPU slots (%d GPU(s) x %d job(s) each) are taken; waiting",
                     len(order), len(gpus), jobs_per_gpu)
            told = True
        # Jitter: jobs that wait together do not retry in lockstep.
        time.sleep(step * random.uniform(1.0, 1.5))
        step = min(2 * step, MAX_WAIT_STEP_S)


def _hold(slot: Slot, env, waited: float) -> Slot:
    # Who holds it, for a person looking at the lock directory.
    os.ftruncate(slot.fd, 0)
    os.write(slot.fd, f"pid {os.getpid()} {slot.label}\n".encode())
    if "CUDA_VISIBLE_DEVICES" not in env and "CUDA_DEVICE_ORDER" not in env:
        # Indices came from nvidia-smi, which numbers GPUs in PCI bus order;
        # CUDA's default order (fastest first) may differ.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    env[GPU_ENV] = slot.gpu
    env[SLOT_ENV] = str(slot.index)
    log.info("GPU slot %d of %d: physical GPU %s (CUDA_VISIBLE_DEVICES=%s)%s",
             slot.index, slot.count, slot.gpu, slot.gpu,
             f", after waiting {waited:.1f} s" if waited >= 0.5 else "")
    _record("acquired", slot, waited=waited)
    return slot
