#!/usr/bin/env python
"""Inference latency on this CPU: PyTorch eager against ONNX Runtime fp32 and int8.

One run, one process: for the default teacher (DeepNN) and student
(LightNN), random weights (latency does not depend on them), it exports the
ONNX file exactly as the workflow's export job does (normalisation baked
in), quantises it to int8 (static, QDQ, calibrated on random images), and
times all three at batch 1 and a large batch, on one thread and on every
available core, with kdflow.deploy.timing as the workflow's timing job does
(both models in one process, round by round): the median of --runs calls
spread over --rounds rounds after --warmup untimed ones, PyTorch in fp32
channels_last inference mode as kdflow runs it.

Prints the CPU's name and the instruction sets that decide int8 speed, the
file sizes, and per case the milliseconds per call with each ONNX Runtime
number's speed-up against eager (above 1x: faster). PyTorch's own kernels can
be held to AVX2 with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (the
line `torch kernels` shows what it used); ONNX Runtime's kernels ignore both.

    python bench/export.py [--batch 256] [--runs 20] [--rounds 5] [--warmup 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdflow.data.arrays import CIFAR10_MEAN, CIFAR10_STD, IMAGE_SHAPE  # noqa: E402
from kdflow.deploy import timing as latency  # noqa: E402
from kdflow.deploy.onnx_export import export_onnx  # noqa: E402
from kdflow.deploy.quantize import quantize_int8  # noqa: E402
from kdflow.models.zoo import build_model  # noqa: E402

MODELS = ("deepnn", "lightnn")


def flag(v) -> str:
    return "unknown" if v is None else ("yes" if v else "no")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="the large batch, beside batch 1")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls before each case")
    ap.add_argument("--runs", type=int, default=20, help="timed calls per case (median)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds the timed calls spread over")
    ap.add_argument("--threads", type=int, default=0, help="the many-thread count (0: all cores)")
    ap.add_argument("--calibration", type=int, default=256, help="random calibration images")
    args = ap.parse_args()

    cpu = latency.cpu_info()
    print(f"CPU {cpu['name']} ({cpu['machine']}, {cpu['cores']} cores available): "
          + ", ".join(f"{f} {flag(cpu[f])}" for f in (*latency.FLAGS, "amx")))
    print(f"torch {torch.__version__} (torch kernels {torch.backends.cpu.get_cpu_capability()}), "
          f"onnxruntime {onnxruntime.__version__}; median of {args.runs} calls after "
          f"{args.warmup} warm-up, random 0..255 images")

    rng = np.random.default_rng(0)
    calibration = rng.integers(0, 256, (args.calibration, *IMAGE_SHAPE), dtype=np.uint8)
    batches = sorted({1, args.batch})
    subjects, sizes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            torch.manual_seed(0)
            model = build_model(name).to(memory_format=torch.channels_last).eval()
            files = {"fp32": Path(tmp) / f"{name}.onnx", "int8": Path(tmp) / f"{name}.int8.onnx"}
            export_onnx(model, files["fp32"], CIFAR10_MEAN, CIFAR10_STD, IMAGE_SHAPE, name)
            quantize_int8(files["fp32"], files["int8"], calibration)
            sizes[name] = {p: f.stat().st_size for p, f in files.items()}
            subjects.append(latency.Subject(name, model, files, CIFAR10_MEAN, CIFAR10_STD,
                                            IMAGE_SHAPE))
        rows, _ = latency.time_models(subjects, batch=args.batch, threads=args.threads,
                                      warmup=args.warmup, runs=args.runs, rounds=args.rounds)

    print()
    for name, s in sizes.items():
        print(f"{name}: model.onnx {s['fp32'] / 1e6:.2f} MB, model.int8.onnx "
              f"{s['int8'] / 1e6:.2f} MB ({s['fp32'] / s['int8']:.1f}x smaller)")
    print(f"\n{'model':8} {'batch':>5} {'threads':>7} {'eager ms':>10} "
          f"{'ORT fp32 ms':>12} {'':>8} {'ORT int8 ms':>12} {'':>8}  int8 img/s")
    cell = {(r["key"], r["runtime"], r["precision"], r["batch"], r["threads"]): r for r in rows}
    for name in MODELS:
        for t in latency.thread_counts(args.threads):
            for b in batches:
                eager, fp32, int8 = (cell[(name, rt, p, b, t)] for rt, p in (
                    ("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")))
                e = eager["median_ms"]
                print(f"{name:8} {b:5} {t:7} {e:10.3f} "
                      f"{fp32['median_ms']:12.3f} {e / fp32['median_ms']:7.2f}x "
                      f"{int8['median_ms']:12.3f} {e / int8['median_ms']:7.2f}x  "
                      f"{int8['images_per_s']:10,.0f}")


if __name__ == "__main__":
    main()
