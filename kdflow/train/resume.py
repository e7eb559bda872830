"""Training that survives preemption: resumable state and SIGTERM handling.

SLURM sends SIGTERM at a time limit or preemption, then SIGKILL a little
later. Training saves its complete state (weights, optimiser, RNG streams,
history, position in the epoch) at the end of every epoch and, on SIGTERM, at
the next step boundary; a rerun of the job continues from it and ends with
the same result as an uninterrupted run. The state lives beside the job's
outputs but is not one of them, so Snakemake does not delete it when the job
fails, and it is removed once the outputs are written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Optional

import torch

import kdflow
from kdflow import KdflowError
from kdflow.core import atomic

log = logging.getLogger(__name__)

FORMAT = "kdflow-resume-1"


class Preempted(KdflowError):
    """Raised at a step boundary after SIGTERM, once the state is saved."""


@functools.cache
def library_digest() -> str:
    """sha256 of the kdflow library's source: every .py file of the package,
    subpackages included, by sorted path. Part of a training job's identity:
    Snakemake reruns a job when its script changes, not when the library
    does, so a state saved by other library code (another step order, loss,
    or random stream) must not be continued by this one."""
    root = Path(kdflow.__file__).resolve().parent
    h = hashlib.sha256()
    for rel in sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")):
        data = (root / rel).read_bytes()
        # Name and length first: moving code between files changes the digest.
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def fingerprint(**what) -> str:
    """Identity of a training job: a saved state resumes only the same job
    (same config, seed, data split and teacher), never a changed one."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def save(path: str | os.PathLike, state: dict) -> None:
    # Atomic: a kill mid-write keeps the previous state. The library's digest
    # (also in the job's fingerprint) lets a refusal say why.
    atomic.save_torch(path, {"format": FORMAT, "library": library_digest(), **state})


def load(path: Optional[str | os.PathLike], job: str) -> Optional[dict]:
    """The saved state of this job, or None.

    A state that cannot be read, or that belongs to another job (another
    config, input, device type: a CUDA generator state cannot be restored
    on a CPU, or kdflow library code), is set aside under a new name with
    one log line, never fatal: the job then trains from scratch, and every
    retry does too instead of failing on the same file."""
    if path is None or not Path(path).exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file
        set_aside(path, f"unreadable ({e})")
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("job") != job:
        library = isinstance(state, dict) and state.get("library")
        set_aside(path, "it was saved by other kdflow library code (the library changed since)"
                  if library and library != library_digest() else
                  "it belongs to a different config, input, device type or precision")
        return None
    return state


def set_aside(path: str | os.PathLike, why: str) -> Path:
    """Rename a state that must not be resumed to resume.pt.set-aside[.N]."""
    path = Path(path)
    target = path.with_name(path.name + ".set-aside")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.set-aside.{n}")
        n += 1
    os.replace(path, target)
    log.warning("not resuming from %s: %s; set aside as %s, training from scratch",
                path, why, target.name)
    return target


def remove(path: Optional[str | os.PathLike]) -> None:
    if path is not None:
        Path(path).unlink(missing_ok=True)


class TermGuard:
    """Turns SIGTERM into a flag the training loop checks between steps."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.requested, self._previous = enabled, False, None

    def _handler(self, signum, frame):
        self.requested = True
        log.warning("received SIGTERM: saving state at the next step boundary")

    def __enter__(self):
        if self.enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            signal.signal(signal.SIGTERM, self._previous)
