#!/usr/bin/env python
"""Scale: how conversion, training and evaluation grow with the number of images and their size.

For each image size S and count N (synthetic images, 10 classes, a fifth
of N as test images), each step runs in a process of its own, as the
workflow's jobs do, and reports its wall time and peak resident memory
(VmHWM, read by the process itself at its end):

  convert   a tree of N JPEG files at S x S (train/ and test/, written
            beforehand, not timed) converted to the .npz: decoding, the
            scratch file and the chunked write (kdflow.data.datasets.convert)
  train     one training job, 1 epoch of LightNN over the training split
            (kdflow.train.job.train), its images streamed from the .npz
  evaluate  one evaluation job on the test images (kdflow.analysis.evaluate),
            streamed too

plus the .npz's size and what `placement.images: auto` would choose for the
training job on this machine. A job's peak should stay flat in N (what it
holds is its batches and its model); only conversion's time grows with N.
The conversion of the largest trees is skipped past --convert-limit images
(writing the JPEG trees takes longer than converting them); the jobs' .npz
files are written directly, in chunks. Sizes whose .npz would not fit the
disk (twice, with room) are skipped and said so.

    python bench/scale.py                       # 32, 96, 224 px x 5k, 20k, 50k
    python bench/scale.py --sizes 32 224 --counts 5000 20000 --convert-limit 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLASSES = [f"c{i}" for i in range(10)]

# The child's prelude: its own peak, reported as the last line of JSON.
_PRELUDE = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
ARGS = sys.argv[2:]
def report(**r):
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                if l.startswith("VmHWM:"))
    print(json.dumps({**r, "peak": peak}))
t0 = time.perf_counter()
'''

CONVERT = r'''
from kdflow.data.datasets import convert
convert(ARGS[0], ARGS[1], dataset="folder", image_size=int(ARGS[2]))
report(seconds=time.perf_counter() - t0)
'''

TRAIN = r'''
import torch
torch.set_num_threads(int(ARGS[3]))
from kdflow.study import planner
from kdflow.workflow.config import validate
from kdflow.train.job import train
cfg = validate({"teacher": {"model": "lightnn", "epochs": 1, "batch_size": 128},
                "placement": {"images": "streamed"}, "device": "cpu"})
train(planner.lookup(cfg, "teacher").record(), dataset=ARGS[0], split=ARGS[1],
      out_model=ARGS[2] + "/model.pt", out_history=ARGS[2] + "/history.csv", seed=0,
      device="cpu", engine=cfg["engine"], placement=cfg["placement"], threads=int(ARGS[3]))
import csv
row = list(csv.DictReader(open(ARGS[2] + "/history.csv")))[-1]
report(seconds=time.perf_counter() - t0, epoch_seconds=float(row["seconds"]))
'''

EVALUATE = r'''
import torch
torch.set_num_threads(int(ARGS[3]))
from kdflow.analysis.evaluate import evaluate
evaluate(ARGS[0], ARGS[1], ARGS[2], arm="teacher", seed=0, device="cpu",
         threads=int(ARGS[3]), placement={"images": "streamed"})
report(seconds=time.perf_counter() - t0)
'''


def child(body: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + body, str(ROOT), *map(str, args)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synthetic(n: int, size: int, rng: np.random.Generator, chunk: int = 512):
    """(labels, blocks of images): a class's colour plus noise, in chunks."""
    y = rng.permutation(np.arange(n) % 10).astype(np.int64)

    def blocks():
        for i in range(0, n, chunk):
            yb = y[i:i + chunk]
            x = rng.integers(0, 80, (len(yb), 3, size, size), dtype=np.uint8)
            x[np.arange(len(yb)), yb % 3] += (40 + 17 * yb).astype(np.uint8)[:, None, None]
            yield x
    return y, blocks


def write_npz(path: Path, n: int, size: int) -> None:
    """A converted dataset of n training and n/5 test images, written in chunks."""
    from kdflow.data.store import NpzWriter

    rng = np.random.default_rng(0)
    with open(path, "wb") as f, NpzWriter(f) as w:
        for part, count in (("train", n), ("test", max(10, n // 5))):
            y, blocks = synthetic(count, size, rng)
            w.add_chunks(f"x_{part}", np.uint8, (count, 3, size, size), blocks())
            w.add(f"y_{part}", y)
        w.add("classes", np.array(CLASSES))
        w.add("dataset", np.array("folder"))
        w.add("mean", np.array([0.3, 0.3, 0.3]))
        w.add("std", np.array([0.2, 0.2, 0.2]))


def write_tree(root: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for part, count in (("train", n), ("test", max(10, n // 5))):
        y, blocks = synthetic(count, size, rng, chunk=256)
        i = 0
        for x in blocks():
            for img in x:
                d = root / part / CLASSES[y[i]]
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:06d}.jpg", quality=90)
                i += 1


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                flags = open("/proc/cpuinfo").read()
                isa = ("AVX-512" + (" BF16" if "avx512_bf16" in flags else "")
                       if "avx512f" in flags else "AVX2" if "avx2" in flags else "")
                return f"{line.split(':', 1)[1].strip()} ({isa}, {os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 96, 224])
    ap.add_argument("--counts", type=int, nargs="+", default=[5000, 20000, 50000])
    ap.add_argument("--convert-limit", type=int, default=20000,
                    help="convert JPEG trees of at most this many training images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args(argv)

    from kdflow.data.arrays import write_split
    from kdflow.data.memory import available_memory
    from kdflow.data.store import choose_placement

    work = Path(args.dir or tempfile.mkdtemp(prefix="kdflow-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{cpu_name()}, {args.threads} threads, {mb(available_memory() or 0)} MiB available; "
          f"`bench/scale.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    head = ("| S | N train | .npz MB | convert s | convert peak MB | train img/s | "
            "train peak MB | evaluate s | evaluate peak MB | auto would hold |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    skipped = []
    try:
        for size in args.sizes:
            for n in args.counts:
                pixels = (n + max(10, n // 5)) * 3 * size * size
                if 2.2 * pixels > shutil.disk_usage(work).free:
                    skipped.append(f"S={size}, N={n}: {mb(pixels)} MiB of pixels, not enough disk")
                    continue
                d = work / f"s{size}_n{n}"
                d.mkdir(exist_ok=True)
                npz = d / "data.npz"
                conv = None
                if n <= args.convert_limit:
                    write_tree(d / "tree", n, size)
                    conv = child(CONVERT, d / "tree", npz, size)
                    shutil.rmtree(d / "tree")
                else:
                    write_npz(npz, n, size)
                write_split(npz, d / "split.npz", val_size=max(10, n // 10), seed=0)
                out = d / "job"
                out.mkdir(exist_ok=True)
                tr = child(TRAIN, npz, d / "split.npz", out, args.threads)
                ev = child(EVALUATE, out / "model.pt", npz, out / "metrics.json", args.threads)
                import torch

                train_bytes = (n - max(10, n // 10)) * 3 * size * size
                mode, _ = choose_placement(train_bytes, torch.device("cpu"), {})
                train_n = n - max(10, n // 10)
                print(f"| {size} | {n:,} | {mb(npz.stat().st_size)} | "
                      f"{conv['seconds']:.0f} | {mb(conv['peak'])} | " if conv else
                      f"| {size} | {n:,} | {mb(npz.stat().st_size)} | not converted | - | ",
                      end="")
                print(f"{train_n / tr['epoch_seconds']:,.0f} | {mb(tr['peak'])} | "
                      f"{ev['seconds']:.0f} | {mb(ev['peak'])} | {mode} |", flush=True)
                shutil.rmtree(d)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    for line in skipped:
        print(f"\nskipped: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
