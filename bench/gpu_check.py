#!/usr/bin/env python
"""GPU check: what the CPU-only tests cannot show, in one command.

    .venv/bin/python bench/gpu_check.py          # on a CUDA machine, under 4 minutes
    .venv/bin/python bench/gpu_check.py --dry    # all but the CUDA calls, on the CPU

Five checks, each on data this script makes (synthetic CIFAR-shaped images
whose classes differ by a faint pattern under noise, so accuracy stays well
below 100% and bf16 has room to cost something):

1. determinism: a teacher, and kd, hint and cosine students, each trained
   twice with `engine.deterministic: true` (precision auto), give
   byte-identical metrics files. On CUDA this also runs the feature losses'
   backward under torch.use_deterministic_algorithms.
2. bf16: the teacher's test accuracy with bf16 autocast is within
   BF16_TOLERANCE points of fp32's (same seed, same data).
3. throughput: teacher, plain student and KD student, the tutorial's input
   pipeline against kdflow's engine (bench/throughput.py's functions), with
   peak GPU memory.
4. GPU slots (kdflow.core.gpu): jobs that take a slot each see exactly their
   slot's GPU (its UUID, from nvidia-smi) as cuda:0, and jobs that run at
   the same time never share a GPU; with two or more GPUs they spread over
   all of them.
5. placement: the teacher trained with its images resident on the GPU and
   streamed (read from the .npz a batch ahead into pinned memory, copied
   while the previous step computes, kdflow.data.store) gives
   byte-identical metrics, and the two paths' training speed.

Prints one Markdown table for BENCHMARKS.md. Exits 1 if any check fails.
`--dry` runs every step on the CPU with tiny sizes and pretend GPUs: it
tests this script, not a GPU (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import throughput  # noqa: E402  (bench/throughput.py)

# Accuracy points bf16 autocast may lose against fp32 on the short run. The
# two runs differ by bf16 rounding alone, but that perturbs training, so the
# gap includes run-to-run noise: about 1 point (sd) on this data's 4,000
# test images. Three points is a real regression, not noise.
BF16_TOLERANCE = 3.0


@dataclass
class Sizes:
    """How much work each check does."""

    train: int            # training images (validation: a tenth of these)
    test: int
    det_epochs: int       # determinism runs
    bf16_epochs: int      # bf16 vs fp32 runs
    batch: int
    steps: int            # throughput: steps per measurement
    warmup: int
    repeats: int
    hold_s: float         # slots: how long each job holds its slot


FULL = Sizes(train=20000, test=4000, det_epochs=2, bf16_epochs=8, batch=128,
             steps=40, warmup=5, repeats=3, hold_s=3.0)
DRY = Sizes(train=120, test=40, det_epochs=1, bf16_epochs=1, batch=16,
            steps=1, warmup=0, repeats=1, hold_s=0.5)


@dataclass
class Row:
    check: str
    ok: bool | None       # None: a measurement, nothing to pass or fail
    figures: str
    detail: list = field(default_factory=list)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

def make_data(directory: Path, n_train: int, n_test: int, seed: int = 0,
              amplitude: float = 2.5) -> tuple[str, str]:
    """A converted dataset and its split, in kdflow's formats: 10 classes,
    each a fixed random low-frequency pattern of small amplitude under
    strong pixel noise."""
    from kdflow.data.arrays import CIFAR10_MEAN, CIFAR10_STD, write_split

    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 1, (10, 3, 4, 4))
    patterns = coarse.repeat(8, axis=2).repeat(8, axis=3)  # 32x32, blocks of 8

    def images(n):
        y = rng.permutation(np.arange(n) % 10)
        x = 128 + amplitude * patterns[y] + rng.normal(0, 60, (n, 3, 32, 32))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = images(n_train)
    x_test, y_test = images(n_test)
    dataset, split = directory / "data.npz", directory / "split.npz"
    np.savez(dataset, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             classes=np.array([f"class{i}" for i in range(10)]),
             dataset=np.array("cifar10"), mean=np.array(CIFAR10_MEAN),
             std=np.array(CIFAR10_STD))
    write_split(dataset, split, val_size=max(10, n_train // 10), seed=0)
    return str(dataset), str(split)


# --------------------------------------------------------------------------
# Training runs through the library, as the workflow's jobs make them
# --------------------------------------------------------------------------

def train_and_evaluate(work: Path, arm: str, data: tuple[str, str], device: str,
                       engine: dict, epochs: int, batch: int,
                       methods: tuple[str, ...] = ("kd",),
                       placement: dict | None = None) -> dict:
    """Train and evaluate the model at `arm` (a path of the study plan:
    teacher, lightnn/ce, lightnn/kd/T2_w0.25, ...) in `work`/`arm`, as the
    workflow's jobs do; students learn from `work`/teacher."""
    from kdflow.study import planner
    from kdflow.workflow.config import validate
    from kdflow.analysis.evaluate import evaluate
    from kdflow.train.job import train

    out = work / arm
    out.mkdir(parents=True, exist_ok=True)
    # The config's defaults (the tutorial's recipe) but for these sizes.
    sizes = {"epochs": epochs, "batch_size": batch}
    config = validate({"teacher": {"model": "deepnn", **sizes},
                       "student": {"model": "lightnn", **sizes},
                       "kd": {"method": list(methods)}, "engine": engine,
                       "placement": placement or {}})
    teacher = None if arm == "teacher" else str(work / "teacher" / "model.pt")
    train(planner.lookup(config, arm).record(), dataset=data[0], split=data[1],
          teacher=teacher, out_model=str(out / "model.pt"),
          out_history=str(out / "history.csv"), seed=0, device=device,
          engine=config["engine"], placement=config["placement"])
    evaluate(str(out / "model.pt"), data[0], str(out / "metrics.json"),
             arm=arm, seed=0, device=device, teacher=teacher,
             placement=config["placement"])
    return json.loads((out / "metrics.json").read_text())


def check_determinism(work: Path, data, device: str, s: Sizes) -> Row:
    engine = {"deterministic": True}
    methods = ("kd", "hint", "cosine")
    arms = ["teacher", "lightnn/kd/T2_w0.25", "lightnn/hint/w0.25", "lightnn/cosine/w0.25"]
    # Both runs in the same directory: metrics files name their checkpoints.
    metrics = {}
    for run in ("a", "b"):
        shutil.rmtree(work, ignore_errors=True)
        for arm in arms:
            train_and_evaluate(work, arm, data, device, engine, s.det_epochs, s.batch,
                               methods)
            metrics[run, arm] = (work / arm / "metrics.json").read_bytes()
    same, detail = [], []
    for arm in arms:
        a, b = metrics["a", arm], metrics["b", arm]
        same.append(a == b)
        detail.append(f"{arm}: {'identical' if a == b else 'DIFFERENT'} "
                      f"(test accuracy {100 * json.loads(a)['accuracy']:.2f}%)")
    return Row("deterministic runs give byte-identical metrics (teacher, kd, hint, cosine)",
               all(same), f"{sum(same)}/{len(same)} identical", detail)


def check_bf16(work: Path, data, device: str, s: Sizes) -> Row:
    acc = {}
    for precision in ("fp32", "bf16"):
        m = train_and_evaluate(work / precision, "teacher", data, device,
                               {"precision": precision}, s.bf16_epochs, s.batch)
        acc[precision] = 100 * m["accuracy"]
    gap = acc["fp32"] - acc["bf16"]
    return Row(f"bf16 autocast vs fp32, teacher test accuracy ({s.bf16_epochs} epochs)",
               gap <= BF16_TOLERANCE,
               f"fp32 {acc['fp32']:.2f}%, bf16 {acc['bf16']:.2f}%, bf16 loses "
               f"{gap:+.2f} points (tolerance {BF16_TOLERANCE})")


def check_placement(work: Path, data, device: str, s: Sizes) -> Row:
    """Resident and streamed images: the same metrics, and each one's speed."""
    metrics, speed = {}, {}
    for images in ("resident", "streamed"):
        shutil.rmtree(work, ignore_errors=True)     # metrics files name their checkpoints
        train_and_evaluate(work, "teacher", data, device, {"deterministic": True},
                           s.det_epochs, s.batch, placement={"images": images})
        metrics[images] = (work / "teacher" / "metrics.json").read_bytes()
        rows = (work / "teacher" / "history.csv").read_text().splitlines()[1:]
        header = (work / "teacher" / "history.csv").read_text().splitlines()[0].split(",")
        seconds = sum(float(r.split(",")[header.index("seconds")]) for r in rows)
        speed[images] = s.det_epochs * int(s.train * 0.9) / seconds
    same = metrics["resident"] == metrics["streamed"]
    return Row("images resident vs streamed give byte-identical metrics (teacher)", same,
               f"{'identical' if same else 'DIFFERENT'}; training "
               f"{speed['resident']:,.0f} img/s resident, {speed['streamed']:,.0f} img/s "
               f"streamed ({speed['streamed'] / speed['resident']:.2f}x)")


def check_throughput(device_name: str, s: Sizes) -> list[Row]:
    from kdflow.core.device import resolve_device

    device = resolve_device(device_name)
    x, y, teacher, teacher_cl = throughput.problem((s.steps + s.warmup) * s.batch, device)
    rows = []
    for kind, label in (("teacher", "teacher (DeepNN)"), ("student", "student, cross-entropy"),
                        ("kd", "student, KD")):
        t, tc = (teacher, teacher_cl) if kind == "kd" else (None, None)
        if s.warmup:
            throughput.tutorial_run(kind, x, y, device, s.warmup, t, batch=s.batch)
            throughput.kdflow_run(kind, x, y, device, s.warmup, tc, batch=s.batch)
        with throughput.PeakMemory(device) as mem_tut:
            tut = statistics.median(throughput.tutorial_run(kind, x, y, device, s.steps, t,
                                                            batch=s.batch)
                                    for _ in range(s.repeats))
        with throughput.PeakMemory(device) as mem_kdf:
            kdf = statistics.median(throughput.kdflow_run(kind, x, y, device, s.steps, tc,
                                                          batch=s.batch)[0]
                                    for _ in range(s.repeats))
        rows.append(Row(f"throughput, {label}", None,
                        f"tutorial {tut:,.0f} img/s, kdflow {kdf:,.0f} img/s, "
                        f"**{kdf / tut:.2f}x**; peak {mem_tut.describe()} / "
                        f"{mem_kdf.describe()}"))
    return rows


# A job of the slot check: takes a slot as a training job does, then (on
# CUDA) initialises CUDA and reports which GPU it got.
SLOT_JOB = r"""
import json, os, sys, time
from kdflow.core import gpu
lock_dir, hold, use_cuda = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "cuda"
slot = gpu.acquire("auto", jobs_per_gpu=1, lock_dir=lock_dir, label="gpu_check")
out = {"slot": slot.index, "gpu": slot.gpu, "cvd": os.environ["CUDA_VISIBLE_DEVICES"],
       "start": time.time()}
if use_cuda:
    import torch
    torch.ones(1, device="cuda")  # CUDA initialised on the slot's GPU
    out["device_count"] = torch.cuda.device_count()
    out["uuid"] = str(torch.cuda.get_device_properties(0).uuid)
time.sleep(hold)
out["end"] = time.time()
print(json.dumps(out), flush=True)
"""


def _uuids() -> dict[str, str]:
    """nvidia-smi's UUID of each GPU index (PCI bus order, as kdflow.core.gpu's)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout
    pairs = (line.split(",") for line in out.splitlines() if line.strip())
    return {i.strip(): u.strip() for i, u in pairs}


def _same_uuid(a: str, b: str) -> bool:
    norm = lambda u: u.lower().removeprefix("gpu-")  # noqa: E731
    return norm(a) == norm(b)


def check_slots(work: Path, dry: bool, s: Sizes) -> Row:
    from kdflow.core import gpu

    # The GPUs this machine lends us (an existing CUDA_VISIBLE_DEVICES is
    # kept), numbered as nvidia-smi numbers them.
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", gpu.PRETEND_ENV)}
    env.update(PYTHONPATH=str(ROOT), CUDA_DEVICE_ORDER="PCI_BUS_ID")
    if dry:
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env[gpu.PRETEND_ENV] = "0,1"
    gpus = gpu.visible_gpus(env)
    if not gpus:
        return Row("GPU slots", False, "no GPU visible (nvidia-smi lists none)")
    # Twice as many jobs as GPUs, one slot per GPU: half wait for a slot.
    n_jobs = 2 * len(gpus)
    procs = [subprocess.Popen([sys.executable, "-c", SLOT_JOB, str(work / "locks"),
                               str(s.hold_s), "cpu" if dry else "cuda"],
                              env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(n_jobs)]
    jobs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        if p.returncode != 0:
            return Row("GPU slots", False, f"a slot job failed (exit {p.returncode})")
        jobs.append(json.loads(out))
    problems = []
    uuids = {} if dry else _uuids()
    for j in jobs:
        if j["cvd"] != j["gpu"]:
            problems.append(f"job saw CUDA_VISIBLE_DEVICES={j['cvd']}, slot's GPU {j['gpu']}")
        if not dry and (j["device_count"] != 1 or not _same_uuid(j["uuid"], uuids[j["gpu"]])):
            problems.append(f"slot GPU {j['gpu']} ({uuids.get(j['gpu'])}): job saw "
                            f"{j['device_count']} device(s), cuda:0 = {j['uuid']}")
    for i, a in enumerate(jobs):
        for b in jobs[i + 1:]:
            if a["gpu"] == b["gpu"] and a["start"] < b["end"] and b["start"] < a["end"]:
                problems.append(f"two jobs on GPU {a['gpu']} at once")
    used = sorted({j["gpu"] for j in jobs})
    if used != sorted(gpus):
        problems.append(f"GPUs used {used}, visible {gpus}")
    figures = (f"{n_jobs} jobs on {len(gpus)} GPU(s) {','.join(gpus)}: each saw its slot's "
               f"GPU alone, none shared one" if not problems else "; ".join(problems))
    return Row(f"GPU slots ({'pretend GPUs' if dry else 'real GPUs'})", not problems, figures)


# --------------------------------------------------------------------------

def run_check(rows: list[Row], name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        got = fn()
    except Exception as e:  # one failing check must not hide the others' figures
        traceback.print_exc()
        got = Row(name, False, f"error: {type(e).__name__}: {e}")
    for row in got if isinstance(got, list) else [got]:
        row.detail.append(f"{time.perf_counter() - t0:.0f} s")
        rows.append(row)
        print(f"[{'PASS' if row.ok else 'FAIL' if row.ok is False else 'measured'}] "
              f"{row.check}: {row.figures}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true",
                    help="CPU, tiny sizes, pretend GPUs: test this script without a GPU")
    args = ap.parse_args(argv)
    s = DRY if args.dry else FULL
    device = "cpu" if args.dry else "cuda"

    import torch

    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry to test the script on a CPU",
              file=sys.stderr)
        return 2
    if args.dry:
        torch.set_num_threads(1)
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kdflow-gpu-check-") as tmp:
        work = Path(tmp)
        # Slots first: its jobs are separate processes, and this one has not
        # touched CUDA yet (not that it matters to them).
        run_check(rows, "GPU slots", lambda: check_slots(work / "slots", args.dry, s))
        run_check(rows, "throughput", lambda: check_throughput(device, s))
        data = make_data(work, s.train, s.test)
        run_check(rows, "bf16", lambda: check_bf16(work / "bf16", data, device, s))
        # Last: deterministic mode stays on for the rest of the process.
        run_check(rows, "determinism",
                  lambda: check_determinism(work / "determinism", data, device, s))
        run_check(rows, "placement",
                  lambda: check_placement(work / "placement", data, device, s))

    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    print(f"\n{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{dt.date.today().isoformat()}, `bench/gpu_check.py{' --dry' if args.dry else ''}`"
          f" in {time.perf_counter() - started:.0f} s\n")
    print("| check | result | figures |\n|---|---|---|")
    for r in rows:
        result = "pass" if r.ok else "**FAIL**" if r.ok is False else "measured"
        detail = f" ({'; '.join(r.detail)})" if r.detail else ""
        print(f"| {r.check} | {result} | {r.figures}{detail} |")
    return 1 if any(r.ok is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
