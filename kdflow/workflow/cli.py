"""How workflow scripts run a library function: logging and clean failures."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Callable, Optional

from kdflow import KdflowError
from kdflow.core import gpu


def run_step(log_path: str, step: Callable[[], object], device: Optional[str] = None,
             gpu_config: Optional[dict] = None) -> None:
    """Run `step` with logging to `log_path` and to stderr.

    A KdflowError (bad input) ends the job with its one-paragraph message, no
    traceback; an unexpected error writes its traceback to the log only and
    names the log on stderr.

    Jobs that declare gpu=1 pass their `device` and the config's `gpu`
    section: before `step` (which initialises CUDA) they take a GPU slot
    (kdflow.core.gpu), held until the job ends.
    """
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.FileHandler(log_path, mode="w"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    slot = None
    try:
        if gpu_config is not None:
            slot = gpu.acquire(device or "auto", jobs_per_gpu=gpu_config["jobs_per_gpu"],
                               lock_dir=gpu_config["lock_dir"], label=log_path)
        step()
    except KdflowError as e:
        logging.getLogger("kdflow").error("%s", e)
        sys.exit(1)
    except Exception:
        with open(log_path, "a") as f:
            f.write(traceback.format_exc())
        print(f"kdflow: unexpected error; traceback in {log_path}", file=sys.stderr)
        sys.exit(1)
    finally:
        if slot is not None:
            slot.release()
