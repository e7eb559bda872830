"""Training that survives SIGKILL and SIGTERM, and resumes to the same result."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.helpers.workflow import REPO

EPOCHS = 5


def start_job(workdir: Path, data: Path, library: Path = REPO) -> subprocess.Popen:
    """A teacher training job as the workflow runs it, in its own process,
    with the kdflow library found under `library`."""
    out = workdir / "seed0" / "teacher"
    code = f"""
from kdflow.workflow.cli import run_step
from kdflow.workflow.config import validate
from kdflow.train.job import train
from kdflow.study import planner
cfg = validate({{"teacher": {{"model": "deepnn", "epochs": {EPOCHS}, "batch_size": 32}},
                "engine": {{"deterministic": True}}}})
arm = planner.lookup(cfg, "teacher").record()
run_step({str(workdir / 'train.log')!r}, lambda: train(
    arm, dataset={str(data / 'cifar10.npz')!r}, split={str(data / 'split.npz')!r},
    out_model={str(out / 'model.pt')!r}, out_history={str(out / 'history.csv')!r},
    seed=0, device="cpu", threads=1, engine=cfg["engine"], placement={{}}))
"""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(library)}
    # Run from the job's directory: from the checkout, "-c" code would
    # import the checkout's library whatever PYTHONPATH says.
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def saved_epoch(state: Path) -> int:
    try:
        return torch.load(state, weights_only=True)["epoch"]
    except Exception:  # not there yet
        return -1


def wait_for_epoch(proc, state: Path, epoch: int, timeout=300) -> None:
    t0 = time.time()
    while saved_epoch(state) < epoch:
        assert proc.poll() is None, "the job ended before it could be interrupted"
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def result(workdir: Path):
    out = workdir / "seed0" / "teacher"
    ckpt = torch.load(out / "model.pt", weights_only=True)
    history = pd.read_csv(out / "history.csv").drop(columns="seconds")
    return ckpt, history


@pytest.fixture(scope="module")
def uninterrupted(workflow_run, tmp_path_factory):
    workdir, _ = workflow_run
    d = tmp_path_factory.mktemp("uninterrupted")
    proc = start_job(d, workdir / "results" / "data")
    assert proc.wait() == 0, proc.stdout.read()
    return result(d)


def assert_same(a, b):
    (ca, ha), (cb, hb) = a, b
    pd.testing.assert_frame_equal(ha, hb)
    assert ca["best_epoch"] == cb["best_epoch"]
    for k in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][k], cb["state_dict"][k]), k


def test_killed_job_resumes_to_the_same_result(workflow_run, uninterrupted, tmp_path):
    workdir, _ = workflow_run
    data = workdir / "results" / "data"
    state = tmp_path / "seed0" / "teacher" / "resume.pt"
    proc = start_job(tmp_path, data)
    wait_for_epoch(proc, state, 2)
    proc.send_signal(signal.SIGKILL)   # no chance to clean up, as in an OOM kill
    proc.wait()
    at = saved_epoch(state)
    assert 2 <= at < EPOCHS
    proc = start_job(tmp_path, data)
    assert proc.wait() == 0, proc.stdout.read()
    log = (tmp_path / "train.log").read_text()
    assert f"resuming from the end of epoch {at}" in log
    assert not state.exists(), "resume state left behind after success"
    assert_same(result(tmp_path), uninterrupted)


def test_sigterm_saves_state_and_exits_nonzero(workflow_run, uninterrupted, tmp_path):
    workdir, _ = workflow_run
    data = workdir / "results" / "data"
    state = tmp_path / "seed0" / "teacher" / "resume.pt"
    proc = start_job(tmp_path, data)
    wait_for_epoch(proc, state, 1)
    proc.send_signal(signal.SIGTERM)   # what SLURM sends at a time limit
    out, _ = proc.communicate()
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in out and "Traceback" not in out
    assert state.exists()
    assert not (tmp_path / "seed0" / "teacher" / "model.pt").exists()
    proc = start_job(tmp_path, data)
    assert proc.wait() == 0, proc.stdout.read()
    assert "resuming from" in (tmp_path / "train.log").read_text()
    assert_same(result(tmp_path), uninterrupted)


def test_state_of_another_config_is_not_resumed(workflow_run, tmp_path, caplog):
    from kdflow.train import resume
    state = tmp_path / "resume.pt"
    resume.save(state, {"job": "some other job", "epoch": 3})
    assert resume.load(state, "some other job")["epoch"] == 3
    # Another job's state is set aside, never resumed and never fatal.
    assert resume.load(state, "this job") is None
    assert not state.exists() and (tmp_path / "resume.pt.set-aside").is_file()
    assert resume.load(state, "this job") is None


def test_a_state_saved_by_other_library_code_is_set_aside(workflow_run, uninterrupted, tmp_path):
    workdir, _ = workflow_run
    data = workdir / "results" / "data"
    # Another version of the library: this one with one line added to a
    # module training uses (Snakemake would rerun nothing: the scripts are
    # the same).
    other = tmp_path / "other"
    shutil.copytree(REPO / "kdflow", other / "kdflow",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "config", other / "config")
    with open(other / "kdflow" / "losses.py", "a") as f:
        f.write("\nLIBRARY_CHANGED = True  # another version of the library\n")
    job = tmp_path / "job"
    state = job / "seed0" / "teacher" / "resume.pt"
    proc = start_job(job, data, library=other)
    wait_for_epoch(proc, state, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saved_epoch(state) >= 1
    # This library's job does not continue the other's state: it sets it
    # aside with one warning and trains from scratch, to the result of an
    # uninterrupted run of this library.
    proc = start_job(job, data)
    assert proc.wait() == 0, proc.stdout.read()
    log = (job / "train.log").read_text()
    assert "resuming from the end of epoch" not in log
    said = [line for line in log.splitlines() if "set aside" in line]
    assert len(said) == 1 and "other kdflow library code" in said[0], said
    assert (state.parent / "resume.pt.set-aside").is_file() and not state.exists()
    assert_same(result(job), uninterrupted)
