#!/usr/bin/env python
"""Training throughput: the tutorial's input pipeline against kdflow's engine.

One run, one process: trains the default teacher (DeepNN), the student
(LightNN) with cross-entropy and the student with distillation for a fixed
number of steps on the same images, two ways:

  tutorial  torchvision-style dataset: each item uint8 -> PIL -> ToTensor ->
            Normalize, DataLoader(batch 128, shuffle, 2 workers), contiguous
            NCHW; KD runs the teacher forward on every step.
  kdflow    the engine with the default config: uint8 tensor in memory, index
            slices of one permutation, batched normalisation, channels_last;
            KD uses the teacher's logits computed once per job (exact without
            augmentation).

Prints images/s of each (median of --repeats), their ratio, peak memory
(resident, including DataLoader workers; CUDA: peak allocated) and the
teacher's achieved GFLOP/s (3x the forward FLOPs per training image, counted
from the model). For KD it also prints the whole-job rate over the default
10 epochs, which charges kdflow's one-off teacher pass.

    python bench/throughput.py [--steps 20] [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdflow.data.arrays import CIFAR10_MEAN, CIFAR10_STD, Normalizer  # noqa: E402
from kdflow.workflow.config import validate  # noqa: E402
from kdflow.core.device import setup  # noqa: E402
from kdflow.models.inference import predict_logits  # noqa: E402
from kdflow.train.engine import TrainConfig, fit  # noqa: E402
from kdflow.distill.losses import kd_loss  # noqa: E402
from kdflow.models.zoo import build_model  # noqa: E402
from kdflow.train.job import teacher_signal  # noqa: E402

BATCH = 128
JOB_EPOCHS = 10  # the default config's epochs, for the whole-job KD rate


# --------------------------------------------------------------------------
# Peak memory of this process and its children (DataLoader workers)
# --------------------------------------------------------------------------

def _rss_kb(pid: int | str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children() -> list[str]:
    kids = []
    for tid in os.listdir("/proc/self/task"):
        try:
            kids += open(f"/proc/self/task/{tid}/children").read().split()
        except OSError:
            pass
    return kids


class PeakMemory:
    """Samples resident memory (self + children) every 20 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak_kb, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            total = _rss_kb("self") + sum(_rss_kb(p) for p in _children())
            self.peak_kb = max(self.peak_kb, total)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        if self.device.type == "cuda":
            self.cuda_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20

    def describe(self) -> str:
        s = f"{self.peak_kb / 1024:,.0f} MB RSS"
        if self.device.type == "cuda":
            s += f", {self.cuda_peak_mb:,.0f} MB CUDA"
        return s


# --------------------------------------------------------------------------
# The tutorial pipeline (the baseline)
# --------------------------------------------------------------------------

class TutorialCIFAR(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: HWC uint8 -> PIL ->
    transform."""

    def __init__(self, x_nchw: np.ndarray, y: np.ndarray):
        self.x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
        self.y = y
        self.transform = transforms.Compose([
            transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def tutorial_run(kind, x, y, device, steps, teacher=None, batch=BATCH) -> float:
    """Images/s of `steps` training steps with the tutorial's loop."""
    loader = DataLoader(TutorialCIFAR(x, y), batch_size=batch, shuffle=True,
                        num_workers=2, persistent_workers=False)
    torch.manual_seed(0)
    model = build_model("deepnn" if kind == "teacher" else "lightnn").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = 0
    t0 = time.perf_counter()
    for step, (xb, yb) in enumerate(loader):
        if step == steps:
            break
        xb, yb = xb.to(device), yb.to(device)
        logits = model(xb)
        if kind == "kd":
            with torch.no_grad():
                t_logits = teacher(xb)
            loss = kd_loss(logits, t_logits, yb, 2.0, 0.25)
        else:
            loss = F.cross_entropy(logits, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(yb)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------
# kdflow's engine, default settings
# --------------------------------------------------------------------------

def kdflow_run(kind, x, y, device, steps, teacher=None, batch=BATCH) -> tuple[float, float]:
    """(training images/s, seconds of the one-off teacher pass for KD)."""
    n = steps * batch
    tx = torch.from_numpy(x[:n]).to(device)
    ty = torch.from_numpy(y[:n]).to(device)
    vx, vy = tx[:batch], ty[:batch]  # fit validates each epoch; keep it small
    # The config's defaults (the tutorial's recipe) but for one epoch of `batch`.
    config = validate({"teacher": {"model": "deepnn", "epochs": 1, "batch_size": batch}})
    cfg = TrainConfig.from_config(config["teacher"], config["engine"])
    teacher_fn, loss_fn, t_once = None, None, 0.0
    if kind == "kd":
        t0 = time.perf_counter()
        # Computed once, as a logit-only method without augmentation does.
        teacher_fn = teacher_signal(teacher, features=False,
                                    cached=predict_logits(teacher, tx, Normalizer(device)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_once = time.perf_counter() - t0
        loss_fn = lambda s: kd_loss(s.logits, s.teacher_logits, s.targets, 2.0, 0.25)  # noqa: E731
    torch.manual_seed(0)
    model = build_model("deepnn" if kind == "teacher" else "lightnn")
    t0 = time.perf_counter()
    fit(model, tx, ty, vx, vy, cfg, seed=0, loss_fn=loss_fn, teacher=teacher_fn)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), t_once


def problem(n: int, device):
    """n random images and labels, and one seeded DeepNN teacher twice: in
    the tutorial's layout and in channels_last for kdflow's engine."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    torch.manual_seed(0)
    teacher = build_model("deepnn").to(device).eval()
    teacher_cl = build_model("deepnn").to(device).to(memory_format=torch.channels_last).eval()
    teacher_cl.load_state_dict(teacher.state_dict())
    return x, y, teacher, teacher_cl


def forward_flops(model, device) -> int:
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32, device=device))
    return counter.get_total_flops()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each case")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per case (median)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args()

    # Device, threads and torch's global flags as a training job sets them.
    device, _ = setup(args.device, validate({})["engine"], args.threads or None)
    x, y, teacher, teacher_cl = problem((args.steps + args.warmup) * BATCH, device)
    flops_fwd = forward_flops(build_model("deepnn").to(device), device)

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps x batch {BATCH}, median of {args.repeats}")
    print(f"teacher forward: {flops_fwd / 1e6:.1f} MFLOP/image "
          f"({flops_fwd / 2e6:.1f} M multiply-accumulates); training ~{3 * flops_fwd / 1e9:.3f} GFLOP/image\n")

    results = {}
    for kind in ("teacher", "student_ce", "kd"):
        t = teacher if kind == "kd" else None
        tc = teacher_cl if kind == "kd" else None
        tut_kind = "student" if kind == "student_ce" else kind
        # Warm-up: kernels, allocator, worker start-up paths.
        tutorial_run(tut_kind, x, y, device, args.warmup, t)
        kdflow_run(tut_kind, x, y, device, args.warmup, tc)
        with PeakMemory(device) as mem_tut:
            tut = [tutorial_run(tut_kind, x, y, device, args.steps, t) for _ in range(args.repeats)]
        with PeakMemory(device) as mem_kdf:
            kdf = [kdflow_run(tut_kind, x, y, device, args.steps, tc) for _ in range(args.repeats)]
        results[kind] = (statistics.median(tut), statistics.median(r for r, _ in kdf),
                         statistics.median(s for _, s in kdf), mem_tut, mem_kdf)

    print(f"{'':12} {'tutorial img/s':>15} {'kdflow img/s':>13} {'ratio':>7}   peak memory tutorial / kdflow")
    for kind, (tut, kdf, _, m_tut, m_kdf) in results.items():
        print(f"{kind:12} {tut:15,.0f} {kdf:13,.0f} {kdf / tut:6.2f}x   "
              f"{m_tut.describe()} / {m_kdf.describe()}")

    tut, kdf, _, _, _ = results["teacher"]
    print(f"\nteacher achieved: tutorial {tut * 3 * flops_fwd / 1e9:,.1f} GFLOP/s, "
          f"kdflow {kdf * 3 * flops_fwd / 1e9:,.1f} GFLOP/s")
    tut, kdf, once, _, _ = results["kd"]
    images = args.steps * BATCH
    job_kdf = JOB_EPOCHS * images / (once + JOB_EPOCHS * images / kdf)
    print(f"KD whole job over {JOB_EPOCHS} epochs (kdflow pays one teacher pass of "
          f"{once:.2f} s per {images} images): tutorial {tut:,.0f} img/s, kdflow "
          f"{job_kdf:,.0f} img/s, ratio {job_kdf / tut:.2f}x")


if __name__ == "__main__":
    main()
