"""The real workflow, run through Snakemake on the tiny archive."""

import json
import re
from html.parser import HTMLParser

import pandas as pd
import pytest
import torch

from tests.helpers.workflow import (REPO, SNAKEMAKE, base_config, deep_update, local_env,
                                    planned_jobs, snakemake)

# The test experiment's arms (kdflow.study.planner): paths under results/seed{seed}/.
TEACHER, BASELINE, KD = "teacher", "lightnn/ce", "lightnn/kd/T2_w0.25"
ARMS = [TEACHER, BASELINE, KD]


def test_run_produces_every_output(workflow_run):
    workdir, config = workflow_run
    res = workdir / "results"
    for seed in config["seeds"]:
        for arm in ARMS:
            for name in ("model.pt", "history.csv", "metrics.json", "speed.json"):
                assert (res / f"seed{seed}" / arm / name).is_file()
            assert (res / "logs" / f"seed{seed}" / arm / "train.log").is_file()
            assert (res / "benchmarks" / f"seed{seed}" / arm / "train.tsv").is_file()
            assert (res / "benchmarks" / f"seed{seed}" / arm / "evaluate.tsv").is_file()
        assert (res / f"seed{seed}" / "teacher" / "train_logits.pt").is_file()
    assert (res / "report.html").is_file()
    # Every figure the report lists is an output, with its caption for
    # `snakemake --report`, and no other PNG is written.
    from kdflow.analysis.figures import shown
    for name in shown(1, True):
        assert (res / "figures" / f"{name}.png").stat().st_size > 1000
        assert (REPO / "report" / f"{name}.rst").is_file(), f"no caption for {name}"
    assert sorted(p.stem for p in (res / "figures").glob("*.png")) == sorted(shown(1, True))
    assert not list(res.rglob("*.part*")), "temporary files left behind"


def test_checkpoints_are_self_describing_and_safe_to_load(workflow_run):
    workdir, config = workflow_run
    for arm, role, section in ((TEACHER, "teacher", "teacher"), (KD, "student_kd", "student")):
        ckpt = torch.load(workdir / f"results/seed1/{arm}/model.pt", weights_only=True)
        assert ckpt["seed"] == 1 and ckpt["role"] == role
        assert ckpt["plan"]["path"] == arm and ckpt["plan"]["role"] == role
        for key, value in config[section].items():
            assert ckpt["plan"]["training"][key] == value
        assert ckpt["plan"]["training"]["lr"] == 0.001  # schema default, filled in
        assert ckpt["engine"] == {"precision": "auto", "compile": False, "deterministic": True}
        assert ckpt["provenance"]["torch"] == torch.__version__
        # The kept weights are those of the best validation epoch.
        hist = pd.read_csv(workdir / f"results/seed1/{arm}/history.csv")
        assert ckpt["best_val_accuracy"] == pytest.approx(hist["val_accuracy"].max())
        assert ckpt["last_epoch"] == len(hist)
    kd = torch.load(workdir / f"results/seed1/{KD}/model.pt", weights_only=True)
    # Exactly this setting's values, not the study's lists.
    assert kd["plan"]["method"] == "kd"
    assert kd["plan"]["values"] == {**config["kd"], "standardize": False}
    # ... and metrics.json carries the same record, which the aggregate reads.
    m = json.loads((workdir / f"results/seed1/{KD}/metrics.json").read_text())
    assert m["plan"] == kd["plan"]


def test_students_of_a_seed_start_from_the_same_weights(workflow_run):
    """Paired comparison: same init, same batches; only the loss differs.
    With soft-target weight 0 the KD student must equal the baseline."""
    from kdflow.study import planner
    from kdflow.workflow.config import validate
    from kdflow.train.job import train
    workdir, config = workflow_run
    res = workdir / "results"
    common = dict(placement={}, dataset=str(res / "data/cifar10.npz"), split=str(res / "data/split.npz"),
                  engine=validate(config)["engine"],
                  # One thread, as the workflow's jobs (--max-threads 1): CPU
                  # kernels' sums depend on the thread count.
                  seed=0, device="cpu", threads=1,
                  teacher=str(res / "seed0/teacher/model.pt"))
    out = workdir / "pairing"
    out.mkdir()
    plain_kd = validate(deep_update(config, {"kd": {"soft_target_weight": 0.0}}))
    train(planner.lookup(plain_kd, "lightnn/kd/T2_w0").record(), out_model=str(out / "kd.pt"),
          out_history=str(out / "kd.csv"), **common)
    base = torch.load(res / f"seed0/{BASELINE}/model.pt", weights_only=True)
    kd = torch.load(out / "kd.pt", weights_only=True)
    for k, v in base["state_dict"].items():
        assert torch.equal(v, kd["state_dict"][k]), k


def test_student_history_records_agreement_with_teacher(workflow_run):
    workdir, _ = workflow_run
    for arm in (BASELINE, KD):
        h = pd.read_csv(workdir / f"results/seed0/{arm}/history.csv")
        for col in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                    "seconds", "val_teacher_agreement", "val_teacher_kl"):
            assert col in h and h[col].notna().all(), col
        assert h["val_teacher_agreement"].between(0, 1).all()
        m = json.loads((workdir / f"results/seed0/{arm}/metrics.json").read_text())
        assert 0 <= m["teacher_agreement"] <= 1 and m["teacher_kl"] >= 0


def test_metrics_are_complete(workflow_run):
    workdir, _ = workflow_run
    m = json.loads((workdir / "results/seed0/teacher/metrics.json").read_text())
    assert m["parameters"] == 1_186_986 and m["test_images"] == 100
    assert m["macs_per_image"] == 94_245_888
    cal = m["calibration"]
    assert 0 <= cal["ece"] <= 1 and sum(b["count"] for b in cal["bins"]) == 100
    speed = json.loads((workdir / "results/seed0/teacher/speed.json").read_text())
    assert speed["latency_ms_batch1"] > 0 and speed["throughput_images_per_s"] > 0
    cm = m["confusion_matrix"]
    assert len(cm) == 10 and sum(map(sum, cm)) == 100
    assert sum(cm[i][i] for i in range(10)) / 100 == pytest.approx(m["accuracy"])
    assert set(m["per_class_accuracy"]) == set(m["classes"])
    assert "teacher_agreement" not in m


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.srcs, self.links = [], [], []

    def handle_data(self, data):
        self.text.append(data)

    def handle_starttag(self, tag, attrs):
        self.srcs += [v for k, v in attrs if k == "src"]
        self.links += [v for k, v in attrs if k == "href"]


def test_report_shows_the_numbers_in_the_metrics_files(workflow_run):
    workdir, config = workflow_run
    html = (workdir / "results/report.html").read_text()
    parser = _Text()
    parser.feed(html)
    text = " ".join(parser.text)
    assert config["report"]["title"] in text
    # Self-contained: every image is embedded, nothing is fetched.
    assert all(s.startswith("data:image/png;base64,") for s in parser.srcs)
    assert all(link.startswith("#") for link in parser.links)
    assert "<script" not in html and "@import" not in html
    from kdflow.analysis.figures import shown
    assert len(parser.srcs) == len(shown(1, True))  # one setting: no study figures
    accs = {}
    for seed in config["seeds"]:
        for arm in ARMS:
            m = json.loads((workdir / f"results/seed{seed}/{arm}/metrics.json").read_text())
            accs[seed, arm] = m["accuracy"]
            assert f"{100 * m['accuracy']:.2f}" in text
            assert f"results/seed{seed}/{arm}/metrics.json" in text
    gains = [accs[s, KD] - accs[s, BASELINE] for s in config["seeds"]]
    mean_gain = sum(gains) / len(gains)
    assert re.search(rf'id="kd-gain">\s*{re.escape(f"{100 * mean_gain:+.2f}")} pts', html)
    for g in gains:
        assert f"{100 * g:+.2f}" in text
    head = json.loads((workdir / "results/summary/headline.json").read_text())
    assert head["gain_mean"] == pytest.approx(mean_gain)
    for n in ("1,186,986", "267,738"):
        assert n in text
    assert "soft_target_weight: 0.25" in text  # the experiment's config
    assert "cannot be judged" in text           # 2 seeds: says so honestly
    assert 'id="paired-test-impossible"' in html and "p = " not in text
    for section in ("study", "significance", "classes", "calibration", "efficiency", "cost", "provenance"):
        assert f'<section id="{section}">' in html
    for fact in ("kdflow commit", "torchvision", "Snakemake", "config hash", "dataset archive md5"):
        assert fact in text


def test_summary_table_is_tidy(workflow_run):
    workdir, config = workflow_run
    table = pd.read_csv(workdir / "results/summary/metrics.csv")
    assert len(table) == len(config["seeds"]) * 3
    assert not table.duplicated(["seed", "arm"]).any()
    arms = pd.read_csv(workdir / "results/summary/arms.csv")
    assert arms.set_index("arm")["n"].tolist() == [2, 2, 2]


# ---------------------------------------------------------------------------
# Only stale steps rerun: dry runs after the real run, one per change.
# ---------------------------------------------------------------------------

# After the aggregate, with export on: the timing job, the ship step, the report.
AFTER_AGGREGATE = {"aggregate": 1, "time_models": 1, "ship": 1, "report": 1, "all": 1}
STUDENT_JOBS = {"train_student_baseline": 2, "train_student_kd": 2, "evaluate": 4,
                "export": 4, **AFTER_AGGREGATE}
# A new temperature is a new setting: its own jobs, the shared logits reused.
NEW_SETTING = {"train_student_kd": 2, "evaluate": 2, "export": 2, **AFTER_AGGREGATE}


@pytest.mark.parametrize("change,expected", [
    pytest.param({}, {}, id="nothing-changed"),
    pytest.param({"student": {"lr": 0.002}}, STUDENT_JOBS, id="student-setting"),
    pytest.param({"kd": {"temperature": 4.0}}, NEW_SETTING, id="kd-setting"),
    pytest.param({"kd": {"temperature": [2.0, 4.0]}}, NEW_SETTING, id="added-temperature"),
    # Only the report, which shows the whole config.
    pytest.param({"kd": {"dkd": {"beta": 2.0}}}, {"report": 1, "all": 1},
                 id="unused-method-setting"),
    pytest.param({"teacher": {"epochs": 2}},
                 {"train_teacher": 2, "teacher_logits": 2, **STUDENT_JOBS, "evaluate": 6, "export": 6},
                 id="teacher-setting"),
    pytest.param({"seeds": [0, 1, 2]},
                 {"train_teacher": 1, "teacher_logits": 1, "train_student_baseline": 1,
                  "train_student_kd": 1, "evaluate": 3, "export": 3, **AFTER_AGGREGATE},
                 id="added-seed"),
    # Deployment settings: the exports and what follows; never training.
    pytest.param({"export": {"calibration_images": 32}}, {"export": 6, **AFTER_AGGREGATE},
                 id="export-setting"),
    pytest.param({"export": {"formats": ["fp32"]}}, {"export": 6, **AFTER_AGGREGATE},
                 id="export-no-int8"),
    # Timing settings: only the timing job and what reads it.
    pytest.param({"export": {"runs": 4, "rounds": 2, "batch": 4, "threads": 1}},
                 {"time_models": 1, "ship": 1, "report": 1, "all": 1}, id="timing-setting"),
    pytest.param({"report": {"title": "Another title"}}, {"report": 1, "all": 1},
                 id="report-setting"),
])
def test_only_stale_steps_rerun(workflow_run, change, expected):
    workdir, config = workflow_run
    assert planned_jobs(workdir, deep_update(config, change)) == expected


def test_default_config_plans_the_full_experiment(tmp_path):
    jobs = planned_jobs(tmp_path, {})
    assert jobs == {"download": 1, "convert": 1, "split": 1, "train_teacher": 3,
                    "teacher_logits": 3, "train_student_baseline": 3, "train_student_kd": 3, "evaluate": 9, "export": 9,
                    "aggregate": 1, "time_models": 1, "ship": 1, "report": 1, "all": 1}


# ---------------------------------------------------------------------------
# Bad input: a clear message, nothing half-written.
# ---------------------------------------------------------------------------

def test_corrupted_archive_fails_clearly_and_leaves_nothing(tmp_path, tiny_archive):
    archive, md5 = tiny_archive
    corrupt = tmp_path / "cifar-10-python.tar.gz"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, as in a bad transfer
    corrupt.write_bytes(bytes(data))
    config = base_config(corrupt, md5)  # the md5 of the good archive
    proc = snakemake(tmp_path, config, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "md5 mismatch" in out and "data.md5" in out
    assert "Traceback" not in out
    data_dir = tmp_path / "results" / "data"
    assert not data_dir.exists() or list(data_dir.iterdir()) == []
    assert not (tmp_path / "results" / "seed0").exists()


@pytest.mark.parametrize("change,key", [
    ({"teacher": {"model": "resnet999"}}, "teacher.model"),
    ({"student": {"epochs": 0}}, "student.epochs"),
    ({"kd": {"temperature": -2}}, "kd.temperature"),
    ({"kd": {"soft_target_weight": 1.5}}, "kd.soft_target_weight"),
    # Through a config file as users write them: YAML's .nan and 10.0.
    ({"teacher": {"lr": float("nan")}}, "teacher.lr: nan is not a finite number"),
    ({"student": {"epochs": 10.0}}, "student.epochs: 10.0 is not an integer"),
])
def test_bad_config_stops_before_any_job(tmp_path, tiny_archive, change, key):
    config = deep_update(base_config(*tiny_archive), change)
    proc = snakemake(tmp_path, config, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert key in out and "invalid config" in out
    assert not (tmp_path / "results").exists()


def test_lint_is_clean():
    import subprocess
    proc = subprocess.run([SNAKEMAKE, "--lint", "-s", str(REPO / "Snakefile")],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=local_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def test_snakemake_report_works(workflow_run):
    workdir, config = workflow_run
    proc = snakemake(workdir, config, "--report", str(workdir / "snakemake-report.zip"),
                     name="report.yaml")
    assert (workdir / "snakemake-report.zip").stat().st_size > 10_000, proc.stderr


# ---------------------------------------------------------------------------
# Deployment: every model exported, checked and quantised (kdflow.deploy).
# ---------------------------------------------------------------------------

def test_every_model_is_exported_and_its_onnx_files_give_the_recorded_results(workflow_run):
    import numpy as np
    import onnxruntime as ort

    from kdflow.data.arrays import channel_stats
    from kdflow.deploy.onnx_export import MAX_DIFF_RELATIVE, pytorch_logits
    from kdflow.models import checkpoint

    workdir, config = workflow_run
    res = workdir / "results"
    with np.load(res / "data/cifar10.npz") as d:
        x, y = d["x_test"], d["y_test"]
        mean, std = channel_stats(d)
    with np.load(res / "data/split.npz") as s:
        train_idx, val_idx = set(s["train_idx"].tolist()), set(s["val_idx"].tolist())
    for seed in config["seeds"]:
        for arm in ARMS:
            where = res / f"seed{seed}" / arm
            record = json.loads((where / "export.json").read_text())
            model, _ = checkpoint.load_model(where / "model.pt")
            reference = pytorch_logits(model, x, mean, std)

            def run(name):
                session = ort.InferenceSession(str(where / name),
                                               providers=["CPUExecutionProvider"])
                return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]

            fp32, int8 = run("model.onnx"), run("model.int8.onnx")
            scale = float(np.abs(reference).max())
            assert float(np.abs(fp32 - reference).max()) <= MAX_DIFF_RELATIVE * scale
            assert record["check"]["onnxruntime"]["correct"] == int((fp32.argmax(1) == y).sum())
            assert record["int8"]["accuracy"]["correct"] == int((int8.argmax(1) == y).sum())
            calibration = set(record["int8"]["calibration"]["indices"])
            assert calibration <= train_idx and not calibration & val_idx
            assert record["onnx"]["opset"] >= 17


def test_the_report_ends_with_what_you_would_ship(workflow_run):
    workdir, config = workflow_run
    html = (workdir / "results/report.html").read_text()
    ship = pd.read_csv(workdir / "results/summary/ship.csv")
    assert list(ship["role"].unique()) == ["teacher", "student_baseline", "student_kd"]
    assert set(zip(ship["runtime"], ship["precision"])) == {
        ("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")}
    assert ship["frontier"].any()
    assert 'id="ship-verdict"' in html and (workdir / "results/figures/ship.png").stat().st_size
    verdict = json.loads((workdir / "results/summary/ship.json").read_text())
    # The rule: per student, the fastest at batch 1 of the variants within
    # the drop threshold on validation.
    for role in ("student_baseline", "student_kd"):
        rows = ship[ship["role"] == role]
        eligible = rows[rows["eligible"]]
        assert rows["shipped"].sum() == 1
        assert rows.loc[rows["shipped"], "latency_ms_batch1"].iloc[0] == \
            eligible["latency_ms_batch1"].min()
        shipped = rows[rows["shipped"]].iloc[0]
        assert verdict[role]["runtime"] == shipped["runtime"]
        assert verdict[role]["precision"] == shipped["precision"]
    # Two seeds: the gain is untested, so the plain student is shipped.
    assert verdict["verdict"]["kind"] == "untested" and verdict["changed"] is False
    assert verdict["ship"] == "student_baseline"
    assert "Distillation did not change what you would ship" in html
    assert f"Ship the plain student as {verdict['student_baseline']['variant']}" in html
    # The as-shipped comparison is of those files' test counts, by seed.
    exports = pd.read_csv(workdir / "results/summary/exports.csv")
    for role, arm in (("student_kd", KD), ("student_baseline", BASELINE)):
        v = verdict[role]
        rows = exports[(exports["arm"] == arm) & (exports["runtime"] == v["runtime"])
                       & (exports["precision"] == v["precision"])].sort_values("seed")
        verdict[role]["counts"] = rows["correct"].tolist()
    assert verdict["test"]["gain_images"] == [
        k - b for k, b in zip(verdict["student_kd"]["counts"],
                              verdict["student_baseline"]["counts"])]
    # The section comes after every model's table, before the appendix.
    assert html.index('id="models"') < html.index('id="ship"') < html.index('id="config"')


def test_the_compared_models_are_timed_together_in_one_job_with_their_spread(workflow_run):
    workdir, config = workflow_run
    res = workdir / "results"
    latency = pd.read_csv(res / "summary/latency.csv")
    samples = pd.read_csv(res / "summary/latency_samples.csv")
    # One timing job for the whole comparison, none inside the exports.
    assert (res / "benchmarks/time_models.tsv").is_file()
    for seed in config["seeds"]:
        for arm in ARMS:
            assert "latency" not in json.loads((res / f"seed{seed}/{arm}/export.json").read_text())
    timed = {f"results/seed{s}/{a}/export.json" for s in config["seeds"] for a in ARMS}
    assert set(latency["key"]) == timed
    runs, rounds = config["export"]["runs"], config["export"]["rounds"]
    assert (latency["n"] == rounds * -(-runs // rounds)).all()
    assert (latency["min_ms"] <= latency["p10_ms"]).all()
    assert (latency["p10_ms"] <= latency["median_ms"]).all()
    assert (latency["median_ms"] <= latency["p90_ms"]).all()
    # Every summary number is the median of its own timed calls.
    case = ["key", "runtime", "precision", "batch", "threads"]
    medians = samples.groupby(case)["ms"].median()
    assert latency.set_index(case)["median_ms"].to_dict() == pytest.approx(medians.to_dict())
    # Speed-ups in ship.csv are ratios of that job's medians.
    ship = pd.read_csv(res / "summary/ship.csv")
    teacher = ship[(ship["role"] == "teacher") & (ship["runtime"] == "onnxruntime")
                   & (ship["precision"] == "fp32")].iloc[0]
    assert ship["speedup_batch1"].tolist() == pytest.approx(
        (teacher["latency_ms_batch1"] / ship["latency_ms_batch1"]).tolist())
    one = latency[(latency["batch"] == 1) & (latency["threads"] == 1)
                  & (latency["key"] == "results/seed0/teacher/export.json")
                  & (latency["runtime"] == "onnxruntime") & (latency["precision"] == "fp32")]
    seeds_teachers = latency[(latency["batch"] == 1) & (latency["threads"] == 1)
                             & latency["key"].str.contains("/teacher/")
                             & (latency["runtime"] == "onnxruntime")
                             & (latency["precision"] == "fp32")]
    assert teacher["latency_ms_batch1"] == pytest.approx(seeds_teachers["median_ms"].mean())
    assert len(one) == 1


def test_with_one_setting_the_study_is_one_line(workflow_run):
    workdir, _ = workflow_run
    html = (workdir / "results/report.html").read_text()
    assert 'id="one-setting"' in html
    assert 'id="study-table"' not in html and 'id="ranking"' not in html
    assert not (workdir / "results/figures/heatmap.png").exists()


def test_export_off_plans_no_export_and_no_ship_figure(workflow_run, tmp_path):
    _, config = workflow_run
    jobs = planned_jobs(tmp_path, deep_update(config, {"export": {"enabled": False}}))
    assert "export" not in jobs and jobs["evaluate"] == 6
