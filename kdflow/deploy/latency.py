"""Latency on the CPU that will run the model: ONNX Runtime fp32 and int8 beside PyTorch eager.

Each case is the median wall time of `runs` calls after `warmup` untimed
ones, on random 0..255 images (the networks' cost does not depend on the
pixels), at each batch size and thread count. PyTorch runs the model as
kdflow does (fp32, channels_last, inference mode) with the same baked-in
normalisation as the ONNX files, so all of them do the same work. Nothing
is assumed about which is faster: int8 pays for its quantise/dequantise
steps and wins only where the CPU's int8 instructions (AVX-512 VNNI, AMX)
outrun its float ones by more, so the CPU's name and flags are recorded
beside the numbers.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from kdflow.deploy.onnx_export import INPUT, Normalised, open_session

# The instruction sets that decide int8 and fp32 speed on x86 CPUs, as
# /proc/cpuinfo names them; AMX is several flags (amx_tile, amx_int8, ...).
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")


def available_cores() -> int:
    """The cores this process may run on (a job's allocation, not the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_info() -> dict:
    """The CPU's name and the instruction sets that matter here; a flag is
    None where the system does not list them (no /proc/cpuinfo)."""
    name, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name is None:
                    name = value.strip()
                elif key in ("flags", "Features") and flags is None:  # x86, Arm
                    flags = set(value.split())
    except OSError:
        pass
    info = {"name": name or platform.processor() or platform.machine(),
            "machine": platform.machine(), "cores": available_cores()}
    for flag in FLAGS:
        info[flag] = None if flags is None else flag in flags
    info["amx"] = None if flags is None else any(f.startswith("amx") for f in flags)
    return info


def median_seconds(call: Callable[[], object], warmup: int, runs: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def thread_counts(threads: int) -> list[int]:
    """One thread and `threads` (0: every available core; never more, as
    oversubscribed cores measure the contention, not the model), once if equal."""
    most = min(threads, available_cores()) if threads else available_cores()
    return sorted({1, most})


def measure(model: nn.Module, files: dict[str, str | os.PathLike], mean, std,
            image_shape: tuple[int, int, int], *, batches: list[int], threads: int,
            warmup: int, runs: int) -> list[dict]:
    """One row per (threads, batch, runtime): PyTorch eager fp32 and each
    ONNX file of `files` ({precision: path}), with its speed-up against
    eager at the same batch and threads (above 1: faster than eager)."""
    eager = Normalised(copy.deepcopy(model), mean, std).float().cpu().eval() \
        .to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    inputs = {b: rng.integers(0, 256, (b, *image_shape)).astype(np.float32) for b in batches}
    rows, eager_s = [], {}
    before = torch.get_num_threads()
    try:
        for t in thread_counts(threads):
            torch.set_num_threads(t)
            with torch.inference_mode():
                for b, x in inputs.items():
                    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
                    eager_s[b] = median_seconds(lambda: eager(xt), warmup, runs)
                    rows.append(_row("pytorch", "fp32", b, t, eager_s[b], eager_s[b]))
            for precision, path in files.items():
                # One session at a time: an idle session's threads spin for
                # a while after each run and would slow the next one down.
                session = open_session(path, threads=t)
                for b, x in inputs.items():
                    s = median_seconds(lambda: session.run(None, {INPUT: x}), warmup, runs)
                    rows.append(_row("onnxruntime", precision, b, t, s, eager_s[b]))
                del session
    finally:
        torch.set_num_threads(before)
    return rows


def _row(runtime: str, precision: str, batch: int, threads: int, seconds: float,
         eager_seconds: float) -> dict:
    return {"runtime": runtime, "precision": precision, "batch": batch, "threads": threads,
            "median_ms": seconds * 1e3, "images_per_s": batch / seconds,
            "speedup_vs_pytorch": eager_seconds / seconds}
