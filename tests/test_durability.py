"""Outputs survive a power cut: each writer fsyncs the file before renaming it
into place and the directory after.

A power cut cannot be staged in a test, so the writers run, unchanged, in a
child process whose os.fsync and os.replace are wrapped (by a sitecustomize
module on its path) to record what they were called on, in order, and then
do their real work.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers.workflow import REPO

TRACER = '''
import os

_log = os.environ["KDFLOW_TEST_TRACE"]
_fsync, _replace = os.fsync, os.replace


def _note(line):
    with open(_log, "a") as f:
        f.write(line + "\\n")


def fsync(fd):
    # The path the descriptor is open on, as the kernel names it.
    _note("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
    return _fsync(fd)


def replace(src, dst, **kw):
    _note(f"replace {os.path.abspath(src)} {os.path.abspath(dst)}")
    return _replace(src, dst, **kw)


os.fsync, os.replace = fsync, replace
'''

WRITES = '''
import torch
from kdflow.core import atomic
from kdflow.models import checkpoint
from kdflow.train import resume
from kdflow.data.fetch import fetch_archive
from kdflow.train.job import write_history

atomic.write_json("out/metrics.json", {"accuracy": 0.5})
checkpoint.save("out/model.pt", state_dict={"w": torch.zeros(10)}, model="lightnn",
                num_classes=10, image_size=32)
resume.save("out/resume.pt", {"job": "j", "epoch": 1})
write_history([{"epoch": 1, "val_accuracy": 0.5}], "out/history.csv")
fetch_archive("source.bin", MD5, "out/archive.tar.gz")
'''

TARGETS = ("metrics.json", "model.pt", "resume.pt", "history.csv", "archive.tar.gz")


def test_every_writer_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path):
    tracer = tmp_path / "tracer"
    tracer.mkdir()
    (tracer / "sitecustomize.py").write_text(TRACER)
    payload = os.urandom(4096)
    (tmp_path / "source.bin").write_bytes(payload)
    trace = tmp_path / "trace.log"
    code = f"MD5 = {hashlib.md5(payload).hexdigest()!r}\n" + textwrap.dedent(WRITES)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, env={**os.environ, "PYTHONPATH": f"{tracer}{os.pathsep}{REPO}",
                          "KDFLOW_TEST_TRACE": str(trace)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = trace.read_text().splitlines()
    out = (tmp_path / "out").resolve()
    for name in TARGETS:
        final, part = out / name, out / f"{name}.part"
        assert final.is_file()
        renamed = events.index(f"replace {part} {final}")
        after = events[renamed + 1:]
        before_next = after[:next((i for i, e in enumerate(after) if e.startswith("replace")),
                                  len(after))]
        # The bytes reached the disk under the temporary name, before the
        # rename; the directory holding the new name, after it and before
        # the next writer began.
        assert f"fsync {part}" in events[:renamed], (name, events)
        assert f"fsync {out}" in before_next, (name, events)
