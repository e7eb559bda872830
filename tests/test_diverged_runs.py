"""Runs that diverge or learn nothing: a non-finite loss stops its job in one
line and saves nothing; a teacher at chance level is flagged in its metrics,
its students' and the report. Both on the chance_run fixture (tests/conftest.py),
run for real once and shared with tests/test_provenance.py."""

import json

from tests.helpers.workflow import deep_update, snakemake


def test_non_finite_loss_stops_the_job_with_one_line_and_saves_nothing(chance_run):
    workdir, config = chance_run
    # SGD at lr 10 with momentum: the weights blow up within a few steps.
    diverging = {"teacher": {"optimizer": "sgd", "lr": 10.0, "momentum": 0.9}}
    proc = snakemake(workdir, deep_update(config, diverging),
                     "results/seed0/teacher/model.pt", check=False)
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
             if "training loss became non-finite" in ln]
    assert lines, proc.stderr
    assert "results/seed0/teacher" in lines[0] and "epoch 1, step" in lines[0]
    assert "lower the learning rate" in lines[0]
    assert "Traceback" not in (workdir / "results/logs/seed0/teacher/train.log").read_text()
    teacher = workdir / "results/seed0/teacher"
    assert not (teacher / "model.pt").exists() and not (teacher / "resume.pt").exists()
    assert not list(teacher.glob("*.part"))


def test_chance_level_models_are_flagged_in_metrics_and_report(chance_run):
    workdir, _ = chance_run
    res = workdir / "results"
    teacher = json.loads((res / "seed0/teacher/metrics.json").read_text())
    assert teacher["at_chance"] and "at chance level" in teacher["flag"]
    for arm in ("lightnn/ce", "lightnn/kd/T2_w0.25"):
        m = json.loads((res / f"seed0/{arm}/metrics.json").read_text())
        assert m["teacher_at_chance"] and "at chance level" in m["flag"]
    head = json.loads((res / "summary/headline.json").read_text())
    assert {f["role"] for f in head["flags"]} == {"teacher", "student_baseline", "student_kd"}
    html = (res / "report.html").read_text()
    assert 'id="flags"' in html and "at chance level: diverged or mis-configured" in html
    # (One setting: the study is one line, its table left out.)
    for table in ("arms", "gain-table", "models-table"):
        section = html.split(f'id="{table}"', 1)[1].split("</table>", 1)[0]
        assert "at chance level" in section, table
