#!/usr/bin/env python
"""bf16 autocast against fp32 on the CPU: does it keep the teacher's accuracy?

One run, one process: the default teacher (DeepNN, the config's defaults:
Adam 1e-3, batch 128) trained on a class-balanced subset, once in fp32 and
once under bf16 autocast for each seed, through the workflow's own job
functions (kdflow.train.job.train, kdflow.analysis.evaluate.evaluate: test
accuracy is always scored in fp32, so the two differ by training alone).
Per seed the two runs start from the same weights and see the same batches,
so the comparison is paired by seed.

Prints each run's test accuracy and training rate, each precision's mean ±
sd over the seeds, the paired difference (bf16 - fp32) with its paired
t-test (kdflow.analysis.stats.paired_comparison), whether the difference is
within seed noise, and the bf16/fp32 img/s ratio. "Within seed noise": the
mean difference is no larger than the seeds' own spread (the larger of the
two precisions' sd) and the paired t-test does not call it beyond chance
(p >= 0.05). The verdict is what `precision: auto` on CPUs with native bf16
rests on (kdflow.core.device).

    python bench/bf16.py --source cifar10-jpeg.tar.gz --dataset folder
    python bench/bf16.py --source cifar-10-python.tar.gz
    python bench/bf16.py            # synthetic data (bench/gpu_check.py's)

Two speeds: first the engine's training steps (kdflow.train.engine.fit),
fp32 and bf16 alternating, median of --speed-repeats: the ratio to quote,
since other load on a shared machine falls on both alike (`--speed-only`
stops there, about a minute); then each job's own rate (images x epochs /
seconds of its epochs, validation included), one run each, which such load
can move several-fold.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kdflow.analysis.evaluate import evaluate  # noqa: E402
from kdflow.analysis.stats import ALPHA, paired_comparison  # noqa: E402
from kdflow.core import device as kdevice  # noqa: E402
from kdflow.data import arrays, datasets  # noqa: E402
from kdflow.study import planner  # noqa: E402
from kdflow.train.job import train  # noqa: E402
from kdflow.workflow.config import validate  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def prepare(work: Path, source: str | None, dataset: str, n_train: int, n_test: int,
            val_size: int) -> tuple[str, str, str]:
    """The converted subset and its split, as the workflow's data steps
    make them; returns (dataset file, split file, what the data is)."""
    if source is None:
        import gpu_check  # noqa: E402  (bench/gpu_check.py: faint patterns under noise)
        data, split = gpu_check.make_data(work, n_train, n_test)
        return data, split, (f"synthetic (bench/gpu_check.py: {n_train} train, "
                             f"{max(10, n_train // 10)} of them validation, {n_test} test)")
    full, data, split = work / "full.npz", work / "data.npz", work / "split.npz"
    t0 = time.perf_counter()
    info = datasets.convert(source, full, dataset)
    arrays.write_subset(full, data, train=n_train, test=n_test, seed=0)
    arrays.write_split(data, split, val_size=val_size, seed=0)
    print(f"converted {Path(source).name} ({dataset}: {info['train']} train, "
          f"{info['test']} test) and drew the subset in {time.perf_counter() - t0:.0f} s")
    return str(data), str(split), (f"{Path(source).name}, class-balanced subset: "
                                   f"{n_train} train ({val_size} of them validation), "
                                   f"{n_test} test")


def run(work: Path, data: str, split: str, seed: int, precision: str, epochs: int,
        threads: int) -> dict:
    """Train and evaluate the teacher of `seed` in `precision`, as the
    workflow's jobs do; returns its test counts and training rate."""
    out = work / f"seed{seed}" / precision
    out.mkdir(parents=True, exist_ok=True)
    config = validate({"teacher": {"model": "deepnn", "epochs": epochs}, "engine": {"precision": precision}})
    train(planner.lookup(config, "teacher").record(), dataset=data, split=split,
          out_model=str(out / "model.pt"), out_history=str(out / "history.csv"),
          seed=seed, device="cpu", engine=config["engine"], threads=threads)
    metrics = evaluate(str(out / "model.pt"), data, str(out / "metrics.json"),
                       arm="teacher", seed=seed, device="cpu", threads=threads)
    ckpt = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    with np.load(split) as d:
        n_train = len(d["train_idx"])
    return {"correct": metrics["correct"], "images": metrics["test_images"],
            "accuracy": 100 * metrics["accuracy"],
            "img_s": n_train * ckpt["last_epoch"] / ckpt["train_seconds"],
            "seconds": ckpt["train_seconds"]}


def speed(x: torch.Tensor, y: torch.Tensor, steps: int, repeats: int) -> dict:
    """Training img/s of the teacher in each precision, by kdflow's engine
    (kdflow.train.engine.fit, channels_last, the default recipe) on `steps`
    batches, fp32 and bf16 alternating `repeats` times after one untimed
    warm-up each, the median kept: other load on a shared machine then falls
    on both alike, which the jobs' own rates (one run each) cannot promise."""
    from kdflow.models.zoo import build_model
    from kdflow.train.engine import TrainConfig, fit

    n = steps * 128
    x, y = x[:n], y[:n]
    rates = {p: [] for p in PRECISIONS}
    for attempt in range(repeats + 1):
        for precision in PRECISIONS:
            config = validate({"teacher": {"model": "deepnn", "epochs": 1},
                               "engine": {"precision": precision}})
            cfg = TrainConfig.from_config(config["teacher"], config["engine"])
            torch.manual_seed(0)
            model = build_model("deepnn")
            t0 = time.perf_counter()
            fit(model, x, y, x[:128], y[:128], cfg, seed=0)
            if attempt:  # the first round warms kernels and allocator up
                rates[precision].append(n / (time.perf_counter() - t0))
    return {p: statistics.median(r) for p, r in rates.items()}


def sd(values) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", help="a CIFAR-10 archive or image-folder archive "
                    "(default: synthetic data)")
    ap.add_argument("--dataset", default="cifar10", help="its data.dataset: cifar10 or folder")
    ap.add_argument("--train", type=int, default=5000, help="training images of the subset")
    ap.add_argument("--val", type=int, default=500, help="validation images, out of --train")
    ap.add_argument("--test", type=int, default=2000, help="test images of the subset")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-steps", type=int, default=20,
                    help="batches per speed measurement (0: none)")
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--speed-only", action="store_true",
                    help="only the speed measurement, no training runs")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("-v", "--verbose", action="store_true", help="the jobs' own log lines")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s")

    cap = kdevice.cpu_bf16_support()
    print(f"CPU: {cap.model or 'unknown'}; native bf16 flags: "
          f"{', '.join(cap.flags) or 'none'}; oneDNN bf16: {cap.onednn}; "
          f"torch {torch.__version__}, {args.threads} threads")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdflow-bf16-") as tmp:
        work = Path(tmp)
        data, split, what = prepare(work, args.source, args.dataset, args.train, args.test,
                                    args.val)
        print(f"data: {what}; teacher DeepNN, {args.epochs} epochs, seeds {args.seeds}\n")
        fast = None
        if args.speed_steps:
            with np.load(data) as d:
                x = torch.from_numpy(d["x_train"])
                y = torch.from_numpy(d["y_train"])
            kdevice.set_threads(args.threads)
            fast = speed(x, y, args.speed_steps, args.speed_repeats)
            print(f"speed, {args.speed_steps} batches of 128, median of {args.speed_repeats}, "
                  f"alternating: fp32 {fast['fp32']:.0f} img/s, bf16 {fast['bf16']:.0f} img/s, "
                  f"ratio {fast['bf16'] / fast['fp32']:.2f}x\n", flush=True)
        if args.speed_only:
            return 0
        runs = {}
        for seed in args.seeds:
            for precision in PRECISIONS:
                runs[seed, precision] = r = run(work, data, split, seed, precision,
                                                args.epochs, args.threads)
                print(f"seed {seed} {precision}: test accuracy {r['accuracy']:.2f}% "
                      f"({r['correct']}/{r['images']}), {r['img_s']:.0f} img/s "
                      f"({r['seconds']:.0f} s)", flush=True)

    acc = {p: [runs[s, p]["accuracy"] for s in args.seeds] for p in PRECISIONS}
    rate = {p: statistics.median(runs[s, p]["img_s"] for s in args.seeds) for p in PRECISIONS}
    diffs = [b - f for f, b in zip(acc["fp32"], acc["bf16"])]
    images = runs[args.seeds[0], "fp32"]["images"]
    test = paired_comparison([runs[s, "bf16"]["correct"] for s in args.seeds],
                             [runs[s, "fp32"]["correct"] for s in args.seeds], images)
    spread = max(sd(acc["fp32"]), sd(acc["bf16"]))
    mean_diff = statistics.mean(diffs)
    p_ok = test.p_value is None or test.p_value >= ALPHA
    within = len(args.seeds) > 1 and abs(mean_diff) <= spread and p_ok

    print(f"\n{'':6} " + " ".join(f"{'seed ' + str(s):>8}" for s in args.seeds)
          + f" {'mean ± sd':>15} {'img/s (median)':>15}")
    for p in PRECISIONS:
        print(f"{p:6} " + " ".join(f"{a:8.2f}" for a in acc[p])
              + f" {statistics.mean(acc[p]):7.2f} ± {sd(acc[p]):5.2f} {rate[p]:15.0f}")
    print(f"{'diff':6} " + " ".join(f"{d:+8.2f}" for d in diffs)
          + f" {mean_diff:+7.2f} ± {sd(diffs):5.2f}")
    p_text = f"p = {test.p_value:.2f}" if test.p_value is not None else f"no t-test ({test.reason})"
    print(f"\nbf16 - fp32: {mean_diff:+.2f} points (paired t-test {p_text}); "
          f"seed spread (larger sd) {spread:.2f} points")
    print(f"jobs' own rates (one run each): bf16 {rate['bf16']:.0f} img/s, fp32 "
          f"{rate['fp32']:.0f} img/s, ratio {rate['bf16'] / rate['fp32']:.2f}x")
    if fast:
        print(f"speed (alternating): ratio {fast['bf16'] / fast['fp32']:.2f}x")
    print(f"verdict: {'within seed noise: bf16 keeps accuracy' if within else 'NOT within seed noise'}"
          f" (|diff| {'<=' if abs(mean_diff) <= spread else '>'} spread, "
          f"{'p >= ' if p_ok else 'p < '}{ALPHA})")
    print(f"whole run {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cpu": cap.model, "bf16_flags": list(cap.flags), "onednn_bf16": cap.onednn,
            "data": what, "epochs": args.epochs, "seeds": args.seeds,
            "accuracy": acc, "img_s": rate, "speed": fast, "diff": diffs, "p_value": test.p_value,
            "spread": spread, "within_noise": within}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
