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

from kdflow.train import resume
from kdflow.study import planner
from kdflow.workflow.config import validate
from kdflow.core.device import EngineOptions
from kdflow.train.job import job_identity, train
from tests.helpers.workflow import REPO, local_env, report_tables

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
        from kdflow.data.datasets import convert as convert_archive
        convert_archive({archive!r}, "out.npz")"""),
    "subset": ("subset.npz", """
        from kdflow.data.arrays import write_subset
        write_subset({dataset!r}, "subset.npz", 100, 0, 0)"""),
    "validation split": ("split.npz", """
        from kdflow.data.arrays import write_split
        write_split({dataset!r}, "split.npz", 50, 0)"""),
    "checkpoint": ("model.pt", """
        import torch
        from kdflow.models import checkpoint
        checkpoint.save("model.pt", state_dict={{"w": torch.zeros(20000)}}, model="lightnn",
                        num_classes=10, image_size=32)"""),
    "resume state": ("resume.pt", """
        import torch
        from kdflow.train import resume
        resume.save("resume.pt", {{"job": "j", "w": torch.zeros(20000)}})"""),
    "history": ("history.csv", """
        from kdflow.train.job import write_history
        write_history([{{"epoch": i, "val_accuracy": 0.5}} for i in range(5000)], "history.csv")"""),
    "metrics": ("metrics.json", """
        from kdflow.analysis.evaluate import write_json
        write_json({{"confusion_matrix": [[0] * 100] * 100}}, "metrics.json")"""),
    "table": ("table.csv", """
        import pandas as pd
        from kdflow.analysis.aggregate import _write_csv
        _write_csv(pd.DataFrame({{"a": range(20000)}}), "table.csv")"""),
    "figure": ("accuracy.png", """
        from kdflow.analysis.report import render_report
        render_report({tables!r}, "report.html", "t", {{}}, figures={{"accuracy": "accuracy.png"}})"""),
    "report": ("report.html", """
        from kdflow.analysis.report import render_report
        render_report({tables!r}, "report.html", "t", {{}})"""),
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_full_disk_fails_clearly_and_leaves_no_debris(kind, tmp_path, workflow_run, summary,
                                                        tiny_archive):
    workdir, _ = workflow_run
    target, code = WRITERS[kind]
    tables = report_tables(summary)
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
    arm, engine = planner.lookup(config, "teacher").record(), config["engine"]
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
              seed=0, device="cpu", threads=1, engine=engine, placement={}, **args)
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


def make_run(workdir: Path, config: Path | None = None, args: str = "") -> subprocess.Popen:
    """The README's command, in its own process group (to kill it whole).
    One thread per job, as the uninterrupted run it is compared with."""
    args = f"--directory {workdir} --max-threads 1 --resources gpu=2 {args}"
    if config:
        args += f" --configfile {config}"
    return subprocess.Popen(["make", "-s", "-C", str(REPO), "run", "CORES=2", f"ARGS={args}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=local_env())


def started(pid: int) -> int | None:
    """Start time of process PID (with the pid, it names one process), or
    None if it is gone or a zombie (which runs nothing and holds no file)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZXx" else int(fields[19])


def process_tree(root: int, *more: int) -> set[tuple[int, int]]:
    """(pid, start time) of ROOT, every process below it, and MORE."""
    parent = {}
    for entry in Path("/proc").iterdir():
        try:
            parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            pass
    tree, grown = {root, *more}, True
    while grown:
        below = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= below
        grown = bool(below)
    return {(pid, started(pid)) for pid in tree if started(pid) is not None}


def still_alive(procs: set[tuple[int, int]], bound: float = 120) -> set[tuple[int, int]]:
    """Those of PROCS still running once all have ended or BOUND seconds have
    passed (a generous bound: a killed process frees its memory first)."""
    t0 = time.monotonic()
    while True:
        alive = {(pid, t) for pid, t in procs if started(pid) == t}
        if not alive or time.monotonic() - t0 > bound:
            return alive
        time.sleep(0.1)


def test_killed_anywhere_the_rerun_ends_as_an_uninterrupted_run(workflow_run, tmp_path):
    reference, config = workflow_run
    cfg = tmp_path / "config.yaml"
    cfg.write_text((reference / "config.yaml").read_text())
    rng = random.Random(2026)
    killed, previous = [], set()
    for stage, trigger in KILL_AT:
        # Started at once after the kill, as a user may: it waits for the
        # killed run's processes to end, then runs.
        proc = make_run(tmp_path, cfg)
        assert not still_alive(previous), f"the run killed before {stage} left processes"
        t0 = time.time()
        while not (tmp_path / trigger).exists() and proc.poll() is None:
            assert time.time() - t0 < 300, f"{stage} never started"
            time.sleep(0.02)
        if proc.poll() is None:
            time.sleep(rng.uniform(0, 1.0))
            previous = process_tree(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            killed.append(stage)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), f"{stage}: {err[-3000:]}"
    assert len(killed) >= 8, killed
    final = make_run(tmp_path, cfg)
    _, err = final.communicate(timeout=900)
    assert final.returncode == 0, err
    assert not still_alive(previous)
    reference_metrics = sorted(p.relative_to(reference)
                               for p in (reference / "results").rglob("metrics.json"))
    assert reference_metrics
    for rel in reference_metrics:
        assert (tmp_path / rel).read_bytes() == (reference / rel).read_bytes(), rel
    assert (tmp_path / "results/report.html").is_file()


# A workflow whose one job starts a helper in a session of its own (as a
# daemon, or a tool that detaches, does) and then keeps running.
DETACHING = textwrap.dedent("""\
    rule all:
        input: "done"

    rule detach:
        output: "done"
        run:
            import subprocess
            helper = subprocess.Popen(["sleep", "600"], start_new_session=True)
            open("helper.pid", "w").write(f"{helper.pid}\\n")
            shell("echo $$ > job.pid; exec sleep 600")
""")


def detaching_run(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, set[tuple[int, int]]]:
    """`make run` of DETACHING, once its job and helper run; with every
    process of the run (its tree, and the helper)."""
    (tmp_path / "Snakefile").write_text(DETACHING)
    proc = make_run(tmp_path, args=f"--snakefile {tmp_path / 'Snakefile'} {' '.join(args)}")
    pids = [tmp_path / "helper.pid", tmp_path / "job.pid"]
    t0 = time.time()
    while not all(p.exists() and p.read_text().endswith("\n") for p in pids):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() - t0 < 300, "the job never started"
        time.sleep(0.05)
    return proc, process_tree(proc.pid, *(int(p.read_text()) for p in pids))


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL make's process group and reap make (not waiting for the end of
    its stderr, which a surviving process may hold)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()


def dry_run(tmp_path: Path) -> subprocess.CompletedProcess:
    proc = make_run(tmp_path, args=f"--snakefile {tmp_path / 'Snakefile'} -n")
    _, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def test_a_killed_run_leaves_no_process_behind_and_the_next_run_starts(tmp_path):
    proc, run = detaching_run(tmp_path)
    try:
        kill(proc)
        again = dry_run(tmp_path)  # at once, while the killed run may still be dying
        assert again.returncode == 0, again.stderr
        assert not still_alive(run), "processes of the killed run still running"
    finally:
        for pid, t in still_alive(run, bound=0):
            os.kill(pid, signal.SIGKILL)


def test_a_second_run_is_refused_while_one_runs(tmp_path):
    proc, run = detaching_run(tmp_path)
    try:
        second = dry_run(tmp_path)
        assert second.returncode != 0
        assert "another run of this checkout is in progress" in second.stderr, second.stderr
        assert proc.poll() is None and not (tmp_path / "done").exists()
    finally:
        kill(proc)
        assert not still_alive(run)


def test_the_next_run_ends_what_a_killed_guardian_left(tmp_path):
    """The run's guardian killed with make: its job and helper live on, and
    the next run ends them before it starts."""
    proc, run = detaching_run(tmp_path)
    try:
        # Stopped first, so that neither the guardian nor the launcher can
        # end the run's processes: the next run has to.
        os.killpg(proc.pid, signal.SIGSTOP)
        for pid, _ in run:
            if b"kdflow.workflow.runguard" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        kill(proc)
        again = dry_run(tmp_path)
        assert again.returncode == 0, again.stderr
        assert not still_alive(run), "the next run left the killed run's processes running"
    finally:
        for pid, t in still_alive(run, bound=0):
            os.kill(pid, signal.SIGKILL)
