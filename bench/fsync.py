#!/usr/bin/env python
"""What fsync costs a training job: N atomic writes of a training state.

A training job writes its resume state (weights, optimiser, best weights, RNG
streams, history: kdflow.train.engine) after every epoch and its checkpoint once.
kdflow.core.atomic fsyncs each `.part` before renaming it and the directory after
(power-cut safety). This times N writes of the default teacher's (DeepNN)
resume state both ways, alternating so both see the same disk weather:

  fsync     kdflow.train.resume.save, as training does (kdflow.core.atomic)
  no fsync  the same torch.save to NAME.part and rename, without the fsyncs

and prints the median and mean time per write of each, their ratio, and the
extra time over a job of the default length (the schema's teacher.epochs:
one resume state per epoch, one checkpoint). The files go to --dir (default:
the current directory, which should be on the disk the results go to; a
tmpfs would make fsync free).

    python bench/fsync.py [--writes 20] [--model deepnn] [--dir .]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdflow.core import atomic  # noqa: E402
from kdflow.train import resume
from kdflow.workflow.config import validate  # noqa: E402
from kdflow.models.zoo import build_model  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def filesystem(path: Path) -> str:
    out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout
    lines = out.splitlines()
    return lines[1].split()[1] if len(lines) > 1 else "unknown"


def training_state(model_name: str) -> dict:
    """A resume state as kdflow.train.engine saves it, after one SGD step."""
    model = build_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 3, 32, 32)).logsumexp(1).mean().backward()
    opt.step()
    return {"job": "bench", "epoch": 1, "partial": None,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": None,
            "extra": None, "rng": {"torch": torch.get_rng_state()},
            "history": [{"epoch": 1, "val_accuracy": 0.5}],
            "best_state": {k: v.clone() for k, v in model.state_dict().items()},
            "best_epoch": 1, "best_val_accuracy": 0.5}


def without_fsync(path: Path, state: dict) -> None:
    tmp = atomic.part_path(path)
    with open(tmp, "wb") as f:
        torch.save({"format": resume.FORMAT, **state}, f)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=20)
    ap.add_argument("--model", default="deepnn")
    ap.add_argument("--dir", default=".")
    args = ap.parse_args()

    epochs = validate({})["teacher"]["epochs"]  # the schema's default
    state = training_state(args.model)
    times = {"fsync": [], "no fsync": []}
    with tempfile.TemporaryDirectory(prefix="bench-fsync-", dir=args.dir) as d:
        path = Path(d) / "resume.pt"
        resume.save(path, state)  # warm up: page cache, allocator
        size = path.stat().st_size
        for _ in range(args.writes):
            for name, write in (("fsync", lambda: resume.save(path, state)),
                                ("no fsync", lambda: without_fsync(path, state))):
                t0 = time.perf_counter()
                write()
                times[name].append(time.perf_counter() - t0)
        fs = filesystem(Path(d))

    print(f"cpu: {cpu_name()} ({os.cpu_count()} cores); filesystem {fs} at {args.dir}")
    print(f"{args.writes} writes each of a {args.model} resume state ({size / 1e6:.1f} MB)")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, ts in times.items():
        print(f"  {name:9s} median {1e3 * med[name]:7.1f} ms   mean {1e3 * statistics.mean(ts):7.1f}"
              f" ms   total {sum(ts):6.2f} s")
    extra = med["fsync"] - med["no fsync"]
    print(f"ratio fsync / no fsync: {med['fsync'] / med['no fsync']:.2f}x "
          f"(+{1e3 * extra:.1f} ms per write)")
    print(f"a {args.model} job of the default {epochs} epochs ({epochs} resume states "
          f"+ 1 checkpoint): about +{(epochs + 1) * extra:.2f} s")


if __name__ == "__main__":
    main()
