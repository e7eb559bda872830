"""A job's process-wide settings: threads, the device, precision and determinism.

Set once at the start of every job (training, evaluation, export, timing) by
`setup`, before any CUDA work; training, inference and export all read the
same `EngineOptions` (config section `engine`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from kdflow import KdflowError
from kdflow.core.schema import fields_of


def set_threads(threads: Optional[int]) -> None:
    """Use `threads` intra-op threads, never more than the cores we may run on:
    oversubscribed cores slow PyTorch's CPU kernels down sharply."""
    if threads:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        torch.set_num_threads(max(1, min(threads, available)))


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdflowError(
            f"device {name!r} requested but CUDA is not available here; "
            "set device: auto (or cpu) in the config"
        )
    return torch.device(name)


@dataclass(frozen=True)
class EngineOptions:
    """How to run, not what to learn (config section `engine`)."""

    precision: str       # auto | fp32 | bf16
    compile: bool        # torch.compile the training model
    deterministic: bool  # bitwise reproducible kernels (slower on CUDA)

    @classmethod
    def from_config(cls, engine: dict) -> "EngineOptions":
        return cls(**fields_of(cls, engine, "the engine section"))


def autocast_dtype(device: torch.device, precision: str) -> Optional[torch.dtype]:
    """bf16 where it pays: on CUDA with bf16 support under 'auto'. On CPUs
    'auto' stays fp32: bf16 autocast only helps with AVX-512 BF16 / AMX
    hardware and there it must be shown to keep accuracy (ask for it
    explicitly with precision: bf16)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure(device: torch.device, options: EngineOptions) -> None:
    """Global flags for determinism or speed, process-wide: set once per
    job, by `setup`, before any CUDA work."""
    if options.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; must be set
        # before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        # Fixed shapes every step: let cuDNN time its algorithms once.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def setup(device: str, engine: dict, threads: Optional[int]) -> tuple[torch.device, EngineOptions]:
    """A job's process-wide settings, in one place: threads, the device and
    the global torch flags (`configure`). Call once, at the start of a job."""
    set_threads(threads)
    options = EngineOptions.from_config(engine)
    dev = resolve_device(device)
    configure(dev, options)
    return dev, options
