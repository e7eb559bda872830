"""Nothing is lost: full disks, resume states from another device, kills at
any moment of a run."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdflow import resume, study
from kdflow.config import validate
from kdflow.engine import EngineOptions
from kdflow.train import job_identity, train
from tests.conftest import REPO, local_env

# ---------------------------------------------------------------------------
# Disk full: every kind of output fails cleanly
# ---------------------------------------------------------------------------

LIMIT = 2 * 1024  # bytes: smaller than any of the outputs written below


def write_under_limit(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` with file sizes capped at LIMIT and SIGXFSZ ignored, so a
    write past the cap fails with EFBIG, as on a full disk."""
    prelude = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, {LIMIT}))
        from kdflow import KdflowError
        try:
    """)
    body = textwrap.indent(textwrap.dedent(code), "    ")
    ending = textwrap.dedent("""
        except KdflowError as e:
            print("KDFLOW-ERROR:", e)
            sys.exit(3)
    """)
    return subprocess.run([sys.executable, "-c", prelude + body + ending], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def summary(workflow_run):
    workdir, _ = workflow_run
    return workdir / "results" / "summary"


WRITERS = {
    "dataset arrays": ("out.npz", """
        from kdflow.datasets import convert as convert_archive
        convert_archive({archive!r}, "out.npz")"""),
    "subset": ("subset.npz", """
        from kdflow.data import write_subset
        write_subset({dataset!r}, "subset.npz", 100, 0, 0)"""),
    "validation split": ("split.npz", """
        from kdflow.data import write_split
        write_split({dataset!r}, "split.npz", 50, 0)"""),
    "checkpoint": ("model.pt", """
        import torch
        from kdflow import checkpoint
        checkpoint.save("model.pt", state_dict={{"w": torch.zeros(20000)}}, model="lightnn",
                        num_classes=10)"""),
    "resume state": ("resume.pt", """
        import torch
        from kdflow import resume
        resume.save("resume.pt", {{"job": "j", "w": torch.zeros(20000)}})"""),
    "history": ("history.csv", """
        from kdflow.train import write_history
        write_history([{{"epoch": i, "val_accuracy": 0.5}} for i in range(5000)], "history.csv")"""),
    "metrics": ("metrics.json", """
        from kdflow.evaluate import write_json
        write_json({{"confusion_matrix": [[0] * 100] * 100}}, "metrics.json")"""),
    "table": ("table.csv", """
        import pandas as pd
        from kdflow.aggregate import _write_csv
        _write_csv(pd.DataFrame({{"a": range(20000)}}), "table.csv")"""),
    "figure": ("accuracy.png", """
        from kdflow.report import render_report
        render_report({tables!r}, "report.html", "t", {{}}, figures={{"accuracy": "accuracy.png"}})"""),
    "report": ("report.html", """
        from kdflow.report import render_report
        render_report({tables!r}, "report.html", "t", {{}})"""),
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_full_disk_fails_clearly_and_leaves_no_debris(kind, tmp_path, workflow_run, summary,
                                                        tiny_archive):
    workdir, _ = workflow_run
    target, code = WRITERS[kind]
    tables = {p.stem: str(p) for p in summary.glob("*.csv")}
    tables["gain"] = str(summary / "kd_gain.csv")
    tables["headline"] = str(summary / "headline.json")
    proc = write_under_limit(code.format(archive=str(tiny_archive[0]), tables=tables,
                                         dataset=str(workdir / "results/data/cifar10.npz")),
                             tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    message = proc.stdout.strip().splitlines()[-1]
    assert "file too large" in message and target in message, message
    assert not (tmp_path / target).exists()
    assert not list(tmp_path.glob("*.part")), list(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# A resume state from another device type
# ---------------------------------------------------------------------------

def test_a_state_saved_on_another_device_type_is_set_aside(workflow_run, tmp_path, caplog):
    workdir, _ = workflow_run
    data = workdir / "results/data"
    config = validate({"teacher": {"model": "lightnn", "epochs": 2, "batch_size": 32},
                       "engine": {"deterministic": True}})
    arm, engine = study.lookup(config, "teacher").record(), config["engine"]
    args = dict(dataset=str(data / "cifar10.npz"), split=str(data / "split.npz"))
    out = tmp_path / "seed0" / "ce"
    out.mkdir(parents=True)
    # What a CUDA node saved after epoch 1: its generator states cannot be
    # restored here, and its fingerprint says so.
    job = job_identity(arm, EngineOptions.from_config(engine), 0, "cuda",
                       args["dataset"], args["split"], None)
    resume.save(out / "resume.pt", {
        "job": job, "epoch": 1, "partial": None,
        "rng": {"cuda": torch.zeros(16, dtype=torch.uint8), "torch": torch.get_rng_state()}})
    with caplog.at_level("WARNING"):
        train(arm, out_model=str(out / "model.pt"), out_history=str(out / "history.csv"),
              seed=0, device="cpu", threads=1, engine=engine, **args)
    assert (out / "resume.pt.set-aside").is_file() and not (out / "resume.pt").exists()
    said = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert len(said) == 1 and "device type" in said[0]
    # Trained from scratch: both epochs are its own.
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2]


# ---------------------------------------------------------------------------
# Kill anywhere
# ---------------------------------------------------------------------------

# The moment each kill aims at: when this job's log appears (the job has just
# started), plus a seeded random delay of up to a second.
KILL_AT = [
    ("download", "results/logs/download.log"),
    ("conversion", "results/logs/convert.log"),
    ("teacher training", "results/logs/seed0/teacher/train.log"),
    ("teacher logits", "results/logs/seed0/teacher/logits.log"),
    ("student training", "results/logs/seed0/lightnn/ce/train.log"),
    ("distilled training", "results/logs/seed1/lightnn/kd/T2_w0.25/train.log"),
    ("evaluation", "results/logs/seed1/teacher/evaluate.log"),
    ("aggregation", "results/logs/aggregate.log"),
    ("report", "results/logs/report.log"),
]


def make_run(workdir: Path, config: Path) -> subprocess.Popen:
    """The README's command, in its own process group (to kill it whole).
    One thread per job, as the uninterrupted run it is compared with."""
    args = f"--directory {workdir} --configfile {config} --max-threads 1 --resources gpu=2"
    return subprocess.Popen(["make", "-s", "-C", str(REPO), "run", "CORES=2", f"ARGS={args}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=local_env())


def test_killed_anywhere_the_rerun_ends_as_an_uninterrupted_run(workflow_run, tmp_path):
    reference, config = workflow_run
    cfg = tmp_path / "config.yaml"
    cfg.write_text((reference / "config.yaml").read_text())
    rng = random.Random(2026)
    killed = []
    for stage, trigger in KILL_AT:
        proc = make_run(tmp_path, cfg)
        t0 = time.time()
        while not (tmp_path / trigger).exists() and proc.poll() is None:
            assert time.time() - t0 < 300, f"{stage} never started"
            time.sleep(0.02)
        if proc.poll() is None:
            time.sleep(rng.uniform(0, 1.0))
            os.killpg(proc.pid, signal.SIGKILL)
            killed.append(stage)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), f"{stage}: {err[-3000:]}"
    assert len(killed) >= 8, killed
    final = make_run(tmp_path, cfg)
    _, err = final.communicate(timeout=900)
    assert final.returncode == 0, err
    reference_metrics = sorted(p.relative_to(reference)
                               for p in (reference / "results").rglob("metrics.json"))
    assert reference_metrics
    for rel in reference_metrics:
        assert (tmp_path / rel).read_bytes() == (reference / rel).read_bytes(), rel
    assert (tmp_path / "results/report.html").is_file()
