"""How workflow scripts run a library function: logging and clean failures."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Callable

from kdflow import KdflowError


def run_step(log_path: str, step: Callable[[], object]) -> None:
    """Run `step` with logging to `log_path` and to stderr.

    A KdflowError (bad input) ends the job with its one-paragraph message, no
    traceback; an unexpected error writes its traceback to the log only and
    names the log on stderr.
    """
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.FileHandler(log_path, mode="w"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    try:
        step()
    except KdflowError as e:
        logging.getLogger("kdflow").error("%s", e)
        sys.exit(1)
    except Exception:
        with open(log_path, "a") as f:
            f.write(traceback.format_exc())
        print(f"kdflow: unexpected error; traceback in {log_path}", file=sys.stderr)
        sys.exit(1)
