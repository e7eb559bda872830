"""Where a result came from: code version, library versions, device, time."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from kdflow.core import gpu
from kdflow.core.device import Precision, cpu_bf16_support

_REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_version(package: str) -> str | None:
    """An installed package's version (None: not installed), as its metadata gives it."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def config_hash(cfg: dict) -> str:
    """Short, stable hash of a config (key order does not matter)."""
    text = json.dumps(cfg, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def collect(device: torch.device | str | None = None,
            precision: Precision | None = None) -> dict:
    """A JSON-serialisable provenance record (only str, bool, None values);
    with `precision`, the precision the job ran in and why."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    record = {
        "kdflow_commit": _git("rev-parse", "HEAD"),
        "kdflow_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": package_version("torchvision"),
        "numpy": package_version("numpy"),
        "snakemake": package_version("snakemake"),
        "hostname": platform.node(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device is not None:
        record["device"] = str(device)
        record["device_name"] = device_name(device)
    # Which GPU: the physical one of the job's slot (kdflow.core.gpu), and what
    # CUDA saw (also where SLURM chose the GPUs). None on the CPU.
    record["gpu"] = os.environ.get(gpu.GPU_ENV)
    record["gpu_slot"] = os.environ.get(gpu.SLOT_ENV)
    record["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    # The host CPU's bf16 capability as detected at run time: what
    # `precision: auto` chose from on a CPU (kdflow.core.device).
    cpu = cpu_bf16_support()
    record["cpu_model"] = cpu.model
    record["cpu_bf16_flags"] = " ".join(cpu.flags)
    record["cpu_bf16_native"] = cpu.native
    if precision is not None:
        record["precision"] = precision.name
        record["precision_reason"] = precision.reason
    return record
