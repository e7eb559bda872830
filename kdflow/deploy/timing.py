"""Latency of the models a report compares, timed together in one job.

Timings taken inside each model's own job measure whatever ran beside it:
two copies of one architecture were once 80x apart. Here every model of
the comparison is loaded in one process that the workflow runs alone, and
the timing goes round by round: in each round every case (model, runtime,
precision, batch, threads) gets one untimed call, then its share of the
timed calls, in an order rotated by one case per round. Drift of the
machine's speed (a neighbour waking up, clocks changing) then hits every
model alike instead of whichever happened to be measured at the time, and
each case keeps every timed call, so its spread (min, quantiles, max) is
known, not only a median.

PyTorch runs a model as kdflow does (fp32, channels_last, inference mode)
with the same baked-in normalisation as its ONNX files, so every variant
does the same work; inputs are random 0..255 images (the networks' cost
does not depend on the pixels). ONNX Runtime sessions are opened with
spinning off: an idle session's threads would otherwise spin after each
call and slow the next case down. Nothing is assumed about which variant is
faster: int8 pays for its quantise/dequantise steps and wins only where the
CPU's int8 instructions (AVX-512 VNNI, AMX) outrun its float ones by more,
so the CPU's name and flags are recorded beside the numbers.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from kdflow import KdflowError
from kdflow.deploy.onnx_export import INPUT, Normalised, open_session

# The instruction sets that decide int8 and fp32 speed on x86 CPUs, as
# /proc/cpuinfo names them; AMX is several flags (amx_tile, amx_int8, ...).
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
# The spread stored per case, as quantiles of its timed calls.
QUANTILES = {"min_ms": 0.0, "p10_ms": 0.1, "median_ms": 0.5, "p90_ms": 0.9, "max_ms": 1.0}
SETTINGS = ("batch", "warmup", "runs", "rounds")


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


def thread_counts(threads: int) -> list[int]:
    """One thread and `threads` (0: every available core; never more, as
    oversubscribed cores measure the contention, not the model), once if equal."""
    most = min(threads, available_cores()) if threads else available_cores()
    return sorted({1, most})


def check_settings(settings: dict) -> dict:
    """{batch, warmup, runs, rounds}: whole numbers, batch, runs and rounds >= 1."""
    if not isinstance(settings, dict) or set(settings) != set(SETTINGS) \
            or not all(isinstance(settings[k], int) and not isinstance(settings[k], bool)
                       for k in SETTINGS) \
            or min(settings["batch"], settings["runs"], settings["rounds"]) < 1 \
            or settings["warmup"] < 0:
        raise KdflowError("latency settings must be {batch: >= 1, warmup: >= 0, runs: >= 1, "
                          f"rounds: >= 1}} (whole numbers), not {settings!r}")
    return settings


class Subject:
    """One model to time: its eager module and ONNX files ({precision: path})."""

    def __init__(self, key: str, model: nn.Module, onnx_files: dict[str, str | os.PathLike],
                 mean, std, image_shape: tuple[int, int, int]):
        self.key, self.onnx_files, self.image_shape = key, dict(onnx_files), tuple(image_shape)
        self.eager = Normalised(copy.deepcopy(model), mean, std).float().cpu().eval() \
            .to(memory_format=torch.channels_last)


def _quantile(sorted_ms: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of sorted values."""
    return float(np.quantile(np.asarray(sorted_ms), q))


def time_models(subjects: list[Subject], *, batch: int, warmup: int, runs: int, rounds: int,
                threads: int, clock: Callable[[], float] = time.perf_counter
                ) -> tuple[list[dict], list[dict]]:
    """Time every subject's variants (PyTorch fp32 and each ONNX file) at
    batch 1 and `batch`, on one thread and on `threads` (0: all cores).

    Each case gets `warmup` untimed calls first, then `rounds` rounds of one
    untimed call and ceil(runs / rounds) timed ones, the cases rotated by one
    place each round. Returns (summary, samples): one summary row per case
    with n and the QUANTILES of its timed calls in milliseconds, and one
    sample row per timed call (round and milliseconds), both keyed by
    subject key, runtime, precision, batch and threads.
    """
    check_settings({"batch": batch, "warmup": warmup, "runs": runs, "rounds": rounds})
    if len({s.key for s in subjects}) != len(subjects):
        raise KdflowError("each model may be timed once per timing job")
    per_round = math.ceil(runs / rounds)
    batches = sorted({1, batch})
    rng = np.random.default_rng(0)
    inputs = {(s.image_shape, b): rng.integers(0, 256, (b, *s.image_shape)).astype(np.float32)
              for s in subjects for b in batches}
    samples = []
    before = torch.get_num_threads()
    try:
        for t in thread_counts(threads):
            torch.set_num_threads(t)
            cases = _cases(subjects, batches, inputs, t)
            with torch.inference_mode():
                for _, call in cases:
                    for _ in range(warmup):
                        call()
                for r in range(rounds):
                    shift = r % len(cases)
                    for case, call in cases[shift:] + cases[:shift]:
                        call()      # after another model: caches and threads re-warmed
                        for _ in range(per_round):
                            t0 = clock()
                            call()
                            samples.append({**case, "round": r, "ms": (clock() - t0) * 1e3})
            del cases
    finally:
        torch.set_num_threads(before)
    return summarize(samples), samples


def _cases(subjects, batches, inputs, t) -> list[tuple[dict, Callable[[], object]]]:
    cases = []
    for s in subjects:
        for b in batches:
            x = inputs[(s.image_shape, b)]
            xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            cases.append(({"key": s.key, "runtime": "pytorch", "precision": "fp32", "batch": b,
                           "threads": t}, (lambda m=s.eager, xt=xt: m(xt))))
        for precision, path in s.onnx_files.items():
            session = open_session(path, threads=t, spinning=False)
            for b in batches:
                x = inputs[(s.image_shape, b)]
                cases.append(({"key": s.key, "runtime": "onnxruntime", "precision": precision,
                               "batch": b, "threads": t},
                              (lambda se=session, x=x: se.run(None, {INPUT: x}))))
    return cases


CASE = ("key", "runtime", "precision", "batch", "threads")


def summarize(samples: list[dict]) -> list[dict]:
    """One row per case of `samples`, in first-seen order: n, the QUANTILES
    (ms) and images per second at the median."""
    by_case: dict[tuple, list[float]] = {}
    for row in samples:
        by_case.setdefault(tuple(row[k] for k in CASE), []).append(row["ms"])
    out = []
    for case, ms in by_case.items():
        ms = sorted(ms)
        stats = {name: _quantile(ms, q) for name, q in QUANTILES.items()}
        out.append({**dict(zip(CASE, case)), "n": len(ms), **stats,
                    "images_per_s": case[3] / (stats["median_ms"] / 1e3)})
    return out


def subject_from_export(key: str, record_path: str | os.PathLike) -> Subject:
    """The model an export.json describes (kdflow.deploy.job): its
    checkpoint, the ONNX files beside the record, the normalisation baked
    into them and the input's image shape."""
    import json
    from pathlib import Path

    from kdflow.models import checkpoint

    record_path = Path(record_path)
    try:
        record = json.loads(record_path.read_text())
        files = {p: record_path.parent / f["file"] for p, f in record["files"].items()}
        norm = record["onnx"]["normalisation"]
        shape = tuple(int(n) for n in record["onnx"]["input"]["shape"][1:])
        model_file = record["model"]["file"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KdflowError(f"{record_path} is no complete export record ({type(e).__name__}: "
                          f"{e}); delete it and rerun the export") from None
    model, _ = checkpoint.load_model(model_file)
    return Subject(key, model, files, norm["mean"], norm["std"], shape)


def time_exports(records: list[str], out_summary: str | os.PathLike,
                 out_samples: str | os.PathLike, *, settings: dict, threads: int) -> None:
    """The timing job: the models of these export.json files timed
    together (time_models), keyed by their record's path; latency summary
    (with the CPU's name and flags) and every timed call written as CSV."""
    import pandas as pd

    from kdflow.core import atomic

    settings = check_settings(settings)
    subjects = [subject_from_export(r, r) for r in records]
    summary, samples = time_models(subjects, threads=threads, **settings)
    cpu = cpu_info()
    flags = {f"cpu_{k}": v for k, v in cpu.items() if k != "name"}
    table = pd.DataFrame(summary).assign(cpu=cpu["name"], **flags,
                                         rounds=settings["rounds"], warmup=settings["warmup"])
    atomic.write_with(out_samples, lambda tmp: pd.DataFrame(samples).to_csv(tmp, index=False))
    atomic.write_with(out_summary, lambda tmp: table.to_csv(tmp, index=False))
