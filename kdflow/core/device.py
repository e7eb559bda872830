"""A job's process-wide settings: threads, the device, precision and determinism.

Set once at the start of every job (training, evaluation, export, timing) by
`setup`, before any CUDA work; training, inference and export all read the
same `EngineOptions` (config section `engine`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
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


# The CPU features that make bf16 autocast pay: AVX-512 BF16 (bf16 dot
# products) and AMX (bf16 tile matrix multiplies). Without them oneDNN
# emulates bf16 with fp32 instructions plus conversions, slower than fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# ONEDNN_MAX_CPU_ISA values that stop oneDNN short of its bf16 kernels (the
# project's AVX2-only CI is imitated with ONEDNN_MAX_CPU_ISA=AVX2): the
# flags are still in /proc/cpuinfo, but bf16 would be emulated.
_ISA_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2",
                     "AVX512_CORE", "AVX512_CORE_VNNI"}
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuBf16:
    """What this CPU offers bf16 autocast, as detected at run time."""

    model: Optional[str]        # /proc/cpuinfo's model name
    flags: tuple[str, ...]      # the NATIVE_BF16_FLAGS it has
    onednn: bool                # oneDNN runs bf16 kernels here (its ISA cap allows them)

    @property
    def native(self) -> bool:
        return bool(self.flags) and self.onednn

    def describe(self) -> str:
        if not self.flags:
            return f"no native bf16 (none of {', '.join(NATIVE_BF16_FLAGS)})"
        if not self.onednn:
            return f"{', '.join(self.flags)}, but oneDNN is held below bf16 (ONEDNN_MAX_CPU_ISA)"
        return f"native bf16 ({', '.join(self.flags)})"


def parse_cpuinfo(text: str) -> tuple[Optional[str], tuple[str, ...]]:
    """(model name, the NATIVE_BF16_FLAGS listed) of a /proc/cpuinfo text;
    the first processor's entry speaks for all."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, tuple(f for f in NATIVE_BF16_FLAGS if f in flags)


def onednn_bf16(max_isa: Optional[str], torch_says: bool) -> bool:
    """Whether oneDNN will use bf16 kernels: torch's own check (which already
    honours an AVX2 cap) and no ONEDNN_MAX_CPU_ISA (or its old name) below
    the bf16 instructions."""
    return torch_says and (max_isa or "").strip().upper() not in _ISA_WITHOUT_BF16


@functools.lru_cache(maxsize=None)
def cpu_bf16_support(cpuinfo: Path = CPUINFO) -> CpuBf16:
    """This CPU's bf16 capability, read once per process (no /proc/cpuinfo,
    as on macOS: no native bf16 assumed)."""
    try:
        model, flags = parse_cpuinfo(Path(cpuinfo).read_text(errors="replace"))
    except OSError:
        model, flags = None, ()
    try:
        torch_says = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        torch_says = False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return CpuBf16(model, flags, onednn_bf16(isa, torch_says))


@dataclass(frozen=True)
class Precision:
    """The precision a job runs in, and why (one line for the job log)."""

    name: str                       # fp32 | bf16
    reason: str

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return torch.bfloat16 if self.name == "bf16" else None


def choose_precision(precision: str, device_type: str, *, cuda_bf16: bool = False,
                     cpu: Optional[CpuBf16] = None) -> Precision:
    """engine.precision on this device, from what was detected (pure: the
    caller passes the detection in). 'auto' takes bf16 on CUDA GPUs that
    support it and on CPUs with native bf16, where bench/bf16.py showed
    bf16 training keeps fp32's accuracy (BENCHMARKS.md); fp32 elsewhere:
    AVX2-only CPUs have no bf16 hardware and would emulate it, slower."""
    if precision == "fp32":
        return Precision("fp32", "engine.precision: fp32")
    if precision == "bf16":
        slow = (device_type == "cpu" and cpu is not None and not cpu.native)
        return Precision("bf16", "engine.precision: bf16" + (
            f"; this CPU has {cpu.describe()}, so bf16 runs emulated, slower than fp32"
            if slow else ""))
    if device_type == "cuda":
        return (Precision("bf16", "auto: this GPU supports bf16") if cuda_bf16 else
                Precision("fp32", "auto: this GPU does not support bf16"))
    if device_type == "cpu" and cpu is not None:
        if cpu.native:
            return Precision("bf16", f"auto: this CPU has {cpu.describe()}, where bf16 "
                             "training kept fp32's accuracy (BENCHMARKS.md)")
        return Precision("fp32", f"auto: this CPU has {cpu.describe()}")
    return Precision("fp32", f"auto: fp32 on {device_type}")


def precision_for(device: torch.device, precision: str) -> Precision:
    """choose_precision with this machine's detected capabilities."""
    device = torch.device(device)
    if device.type == "cuda":
        return choose_precision(precision, "cuda", cuda_bf16=torch.cuda.is_bf16_supported())
    return choose_precision(precision, device.type,
                            cpu=cpu_bf16_support() if device.type == "cpu" else None)


def autocast_dtype(device: torch.device, precision: str) -> Optional[torch.dtype]:
    """The autocast dtype for engine.precision on `device` (None: fp32);
    see choose_precision."""
    return precision_for(device, precision).dtype


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
