"""bench/gpu_check.py without a GPU: its --dry mode runs every step on the
CPU with tiny sizes and pretend GPUs, and any failed check fails the command."""

import subprocess
import sys

from tests.helpers.workflow import REPO

sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


def test_dry_run_exercises_every_check_and_prints_the_table():
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--dry"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout.split("| check | result | figures |\n|---|---|---|\n", 1)[1]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
    results = {r[0].lstrip("| "): r[1] for r in rows}
    assert results == {
        "GPU slots (pretend GPUs)": "pass",
        "throughput, teacher (DeepNN)": "measured",
        "throughput, student, cross-entropy": "measured",
        "throughput, student, KD": "measured",
        f"bf16 autocast vs fp32, teacher test accuracy ({gpu_check.DRY.bf16_epochs} epochs)":
            "pass",
        "deterministic runs give byte-identical metrics (teacher, kd, hint, cosine)": "pass",
        "images resident vs streamed give byte-identical metrics (teacher)": "pass",
    }
    assert "4/4 identical" in table and "4 jobs on 2 GPU(s) 0,1" in table


def test_a_failed_check_fails_the_command(monkeypatch, capsys):
    def bad_slots(*args):
        raise RuntimeError("no slot")

    monkeypatch.setattr(gpu_check, "check_slots", bad_slots)
    monkeypatch.setattr(gpu_check, "check_throughput", lambda *a: [])
    monkeypatch.setattr(gpu_check, "check_bf16", lambda *a: gpu_check.Row(
        "bf16", False, "fp32 80%, bf16 70%"))
    monkeypatch.setattr(gpu_check, "check_determinism", lambda *a: gpu_check.Row(
        "determinism", True, "4/4 identical"))
    monkeypatch.setattr(gpu_check, "check_placement", lambda *a: gpu_check.Row(
        "placement", True, "identical"))
    monkeypatch.setattr(gpu_check, "make_data", lambda *a, **k: ("data.npz", "split.npz"))
    assert gpu_check.main(["--dry"]) == 1
    out = capsys.readouterr().out
    assert "| GPU slots | **FAIL** | error: RuntimeError: no slot" in out
    assert "| bf16 | **FAIL** |" in out and "| determinism | pass |" in out
