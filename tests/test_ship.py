"""What the report says at the end: which variant each student ships, whether
distillation changed that, and every sentence that decides something, from
constructed tables and from one real run (a shared teacher, two seeds, no
soft targets: every gain exactly 0)."""

import json
from html import unescape

import pandas as pd
import pytest

from kdflow.analysis import ship as ship_mod
from kdflow.analysis.report import protocol_differences, render_macro
from kdflow.analysis.stats import paired_comparison, verdict
from kdflow.deploy.quantize import LARGE_DROP
from tests.helpers.workflow import base_config, deep_update, snakemake

IMAGES = 1000
ARMS = {"teacher": "teacher", "student_baseline": "s/ce", "student_kd": "s/kd/T4"}
VARIANTS = ship_mod.VARIANTS


def _tables(val, correct, latency, seeds=(0, 1, 2)):
    """exports.csv and latency.csv rows: `val[role][variant]` validation
    accuracy, `correct[role][variant]` a test count per seed (or one for
    all), `latency[role][variant]` the batch-1 one-thread median (ms)."""
    exports, lat = [], []
    for role, arm in ARMS.items():
        for s in seeds:
            source = f"results/seed{s}/{arm}/export.json"
            for v in VARIANTS:
                c = correct[role][v]
                c = c[s] if isinstance(c, (list, tuple)) else c
                exports.append({"seed": s, "arm": arm, "stage": "selection", "runtime": v[0],
                                "precision": v[1], "accuracy": c / IMAGES, "correct": c,
                                "test_images": IMAGES, "val_accuracy": val[role][v],
                                "val_correct": int(val[role][v] * 500), "val_images": 500,
                                "bytes": 1e6, "large_drop": False, "val_large_drop": False,
                                "agreement": 1.0, "opset": 18, "cpu": "test CPU",
                                "source": source})
                for batch in (1, 8):
                    for threads in (1, 2):
                        ms = latency[role][v] * batch / threads
                        lat.append({"key": source, "runtime": v[0], "precision": v[1],
                                    "batch": batch, "threads": threads, "n": 6,
                                    "min_ms": 0.9 * ms, "p10_ms": 0.95 * ms, "median_ms": ms,
                                    "p90_ms": 1.1 * ms, "max_ms": 1.3 * ms})
    return pd.DataFrame(exports), pd.DataFrame(lat)


def _head(kind="noise", adjusted=False, size=1):
    return {"arms": ARMS, "stage": "selection", "optimistic": adjusted,
            "verdict": {"kind": kind, "adjusted": adjusted, "family_size": size}}


PT, FP32, INT8 = VARIANTS
SAME = {PT: 0.5, FP32: 0.5, INT8: 0.5}


def test_a_flagged_and_slower_distilled_int8_is_not_shipped():
    # The distilled int8 loses 3 points on validation and is slower than its
    # fp32 file; on the test set it would look best. It must not ship.
    val = {"teacher": SAME, "student_baseline": SAME,
           "student_kd": {PT: 0.5, FP32: 0.5, INT8: 0.47}}
    correct = {"teacher": {v: 700 for v in VARIANTS},
               "student_baseline": {v: 500 for v in VARIANTS},
               "student_kd": {PT: 505, FP32: 505, INT8: 560}}
    latency = {"teacher": {PT: 3.0, FP32: 2.0, INT8: 1.5},
               "student_baseline": {PT: 0.4, FP32: 0.10, INT8: 0.08},
               "student_kd": {PT: 0.4, FP32: 0.10, INT8: 0.12}}
    exports, lat = _tables(val, correct, latency)
    table = ship_mod.ship_table(exports, lat, _head())
    kd = table[table["role"] == "student_kd"].set_index("precision")
    assert not kd.loc["int8", "eligible"] and not kd.loc["int8", "shipped"]
    assert kd.loc["int8", "val_drop"] == pytest.approx(0.03)
    shipped = table[table["shipped"]].set_index("role")
    assert shipped.loc["student_kd", ["runtime", "precision"]].tolist() == ["onnxruntime", "fp32"]
    # The plain student's int8 keeps its validation accuracy and is fastest.
    assert shipped.loc["student_baseline", "precision"] == "int8"
    assert "teacher" not in shipped.index


def test_within_the_threshold_the_fastest_ships_even_if_int8():
    val = {"teacher": SAME, "student_baseline": SAME,
           "student_kd": {PT: 0.5, FP32: 0.5, INT8: 0.5 - LARGE_DROP}}
    correct = {r: {v: 500 for v in VARIANTS} for r in ARMS}
    latency = {r: {PT: 0.4, FP32: 0.2, INT8: 0.1} for r in ARMS}
    table = ship_mod.ship_table(*_tables(val, correct, latency), _head())
    assert table.loc[table["shipped"], "precision"].tolist() == ["int8", "int8"]
    # A tie in latency goes to the simpler variant (VARIANTS order).
    latency = {r: {PT: 0.2, FP32: 0.2, INT8: 0.2} for r in ARMS}
    table = ship_mod.ship_table(*_tables(val, correct, latency), _head())
    assert table.loc[table["shipped"], "runtime"].tolist() == ["pytorch", "pytorch"]


def _verdict_of(kd_counts, base_counts, kd_int8=None, head=None):
    val = {r: SAME for r in ARMS}
    correct = {"teacher": {v: 800 for v in VARIANTS},
               "student_baseline": {v: base_counts for v in VARIANTS},
               "student_kd": {PT: kd_counts, FP32: kd_counts, INT8: kd_int8 or kd_counts}}
    latency = {r: {PT: 0.4, FP32: 0.2, INT8: 0.1} for r in ARMS}
    exports, lat = _tables(val, correct, latency, seeds=range(len(base_counts)))
    head = head or _head()
    return ship_mod.ship_verdict(ship_mod.ship_table(exports, lat, head), exports, head)


def test_plain_and_distilled_are_compared_as_shipped_paired_by_seed():
    # In PyTorch fp32 distillation gains 20-30 images on every seed; its
    # shipped int8 file gains nothing. What you ship is what is compared.
    base = [500, 510, 490, 505]
    s = _verdict_of([520, 540, 515, 530], base, kd_int8=[500, 512, 489, 505])
    assert s["student_kd"]["precision"] == "int8"
    assert s["test"]["gain_images"] == [0, 2, -1, 0]
    assert s["verdict"]["kind"] == "noise" and not s["changed"]
    assert s["ship"] == "student_baseline"
    # The same statistics as the headline's.
    assert s["test"] == paired_comparison([500, 512, 489, 505], base, IMAGES).as_dict()


def test_a_gain_beyond_noise_as_shipped_changes_what_you_ship():
    s = _verdict_of([530, 541, 519, 536, 528], [500, 510, 490, 505, 500])
    assert s["verdict"]["kind"] == "beyond" and s["changed"] and s["ship"] == "student_kd"


def test_a_setting_chosen_among_several_is_adjusted_for_the_choice():
    kd, base = [508, 513, 495, 509, 506], [500, 510, 490, 505, 500]
    raw = paired_comparison(kd, base, IMAGES)
    assert raw.p_value < 0.05
    s = _verdict_of(kd, base, head=_head(adjusted=True, size=20))
    v = s["verdict"]
    assert v["adjusted"] and v["adjustment"] == "Bonferroni" and v["family_size"] == 20
    assert v["p_value"] == pytest.approx(min(1, 20 * raw.p_value))
    assert v["kind"] == "noise" and not s["changed"]


# ---------------------------------------------------------------------------
# Every branch of the ship sentence, from constructed records.
# ---------------------------------------------------------------------------

def _sentence(kd, base):
    s = _verdict_of(kd, base)
    html = render_macro("ship_sentence", s)
    return s, " ".join(html.split())


@pytest.mark.parametrize("kd,base,kind,needles,absent", [
    pytest.param([530, 541, 519, 536, 528], [500, 510, 490, 505, 500], "beyond",
                 ["Ship the distilled student as ONNX int8", "beyond seed noise: paired t-test p ="],
                 ["did not change"], id="beyond"),
    pytest.param([505, 500, 495, 515], [500, 510, 490, 505], "noise",
                 ["Ship the plain student", "Distillation did not change what you would ship",
                  "not distinguishable from seed noise (paired t-test p ="],
                 ["beyond seed noise:", "hurts"], id="within-noise"),
    pytest.param([470, 480, 461, 478, 471], [500, 510, 490, 505, 500], "hurts",
                 ["Ship the plain student", "Distillation <em>hurts</em> what you would ship",
                  "beyond seed noise"], ["not distinguishable", "did not change"], id="hurts"),
    pytest.param([503, 513, 493, 508], [500, 510, 490, 505], "equal",
                 ["Ship the plain student", "exactly +3 of 1,000", "sign-flip test gives p = 0.125",
                  "not enough to call the gain beyond seed noise"], ["t-test p ="],
                 id="equal-gains"),
    pytest.param([503, 513, 493, 508, 503, 502], [500, 510, 490, 505, 500, 499], "equal",
                 ["Ship the distilled student", "exactly +3 of 1,000",
                  "That is beyond seed noise by that test"], ["did not change"],
                 id="equal-gains-beyond"),
    pytest.param([500, 510, 490], [500, 510, 490], "equal",
                 ["Ship the plain student", "it changed no seed's result"], [],
                 id="equal-gains-zero"),
    pytest.param([505, 500], [500, 510], "untested",
                 ["Ship the plain student", "a paired test needs at least 3 seeds",
                  "cannot be tested", "add seeds"], ["not distinguishable", "beyond seed noise:"],
                 id="untested"),
])
def test_every_ship_verdict_is_worded_as_its_kind(kd, base, kind, needles, absent):
    s, text = _sentence(kd, base)
    assert s["verdict"]["kind"] == kind
    for needle in needles:
        assert needle in text, text
    for word in absent:
        assert word not in text, text
    assert s["rule"] in unescape(text)


def test_the_shipped_verdict_uses_the_headlines_verdict_function():
    s = _verdict_of([505, 500, 495, 515], [500, 510, 490, 505])
    test = paired_comparison([505, 500, 495, 515], [500, 510, 490, 505], IMAGES)
    assert s["verdict"] == verdict(test, None)


# ---------------------------------------------------------------------------
# One teacher, the confirmation stage, imports, protocol differences.
# ---------------------------------------------------------------------------

SHARED = {"shared": True, "trained_seed": 0, "source": None, "init": None, "seeds": 3}


def test_a_shared_teacher_is_one_model_and_the_tests_are_conditional_on_it():
    text = " ".join(render_macro("teacher_note", SHARED).split())
    assert "one teacher shared by all 3 seeds" in text
    assert "a single model" in text and "no sd, no interval" in text
    assert "conditional on this teacher" in text
    assert "unchanged" not in text


def test_an_imported_teacher_lists_what_could_not_be_checked():
    tr = {**SHARED, "source": {"url": "file:///t.pt", "md5": "0" * 32,
                               "checked": ["architecture", "class count"],
                               "unchecked": ["class names and order (a plain state dict has none)"]}}
    text = " ".join(render_macro("teacher_note", tr).split())
    assert "checked against this config: architecture, class count" in text
    assert "Not checked, as the file could not tell: class names and order" in text


@pytest.mark.parametrize("teacher,retrained", [(SHARED, False), ({"shared": False}, True)])
def test_the_confirmation_stage_says_whether_its_teacher_was_retrained(teacher, retrained):
    head = {"stage": "confirmation", "seeds": [3, 4], "selection_seeds": [0, 1, 2],
            "teacher": teacher, "optimistic": False, "distilled_settings": 4}
    text = " ".join(render_macro("stage_note", head).split())
    assert ("its teacher and its plain twin were retrained" in text) == retrained
    assert ("The teacher was not</strong>" in text) == (not retrained)
    if not retrained:
        assert "trained with seed 0" in text and "teacher.shared: false" in text


def test_published_numbers_state_the_protocol_differences():
    published = {"protocol": {"train_images": 50000, "selected_on": "test",
                              "teacher": "released"}}
    experiment = {"data": {"val_size": 5000}}
    out = protocol_differences(published, experiment, {"teacher": {"shared": False}})
    assert len(out) == 3
    assert "50,000" in out[0] and "5,000" in out[0]
    assert "best test accuracy" in out[1]
    assert "one released teacher" in out[2] and "per seed" in out[2]
    assert protocol_differences({}, experiment, {}) == []


def test_a_dkd_warm_up_longer_than_training_is_warned_at_planning(tmp_path, tiny_archive):
    from kdflow.study import planner
    from kdflow.workflow.config import validate

    config = deep_update(base_config(*tiny_archive), {"kd": {"method": ["kd", "dkd"]}})
    warnings = planner.warnings(planner.plan(validate(config)))
    assert len(warnings) == 1 and "dkd.warmup_epochs is 20" in warnings[0]
    assert "1 epochs" in warnings[0] and "at most 5%" in warnings[0]
    proc = snakemake(tmp_path, config, "-n", "--quiet", "rules")
    assert "dkd.warmup_epochs is 20" in proc.stderr + proc.stdout
    fixed = deep_update(config, {"kd": {"dkd": {"warmup_epochs": 1}}})
    assert planner.warnings(planner.plan(validate(fixed))) == []


# ---------------------------------------------------------------------------
# One real run: one shared teacher, two seeds, no soft targets.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def equal_gain_run(tmp_path_factory, tiny_archive):
    """Two seeds and kd.soft_target_weight 0: the distilled student is its
    plain twin (same weights, same batches), every gain exactly 0; one
    teacher shared by both seeds; export on."""
    workdir = tmp_path_factory.mktemp("equal_gains")
    config = deep_update(base_config(*tiny_archive), {
        "teacher": {"shared": True}, "kd": {"soft_target_weight": 0.0},
        "export": {"enabled": True, "formats": ["fp32"]}})
    snakemake(workdir, config)
    return workdir, config


def test_two_seeds_with_equal_gains_render_a_report(equal_gain_run):
    workdir, _ = equal_gain_run
    head = json.loads((workdir / "results/summary/headline.json").read_text())
    assert head["paired_test"]["equal_gains"] and head["paired_test"]["perm_p_value"] is None
    html = (workdir / "results/report.html").read_text()
    assert 'id="paired-test-impossible"' in html and 'id="paired-test"' not in html
    shipped = json.loads((workdir / "results/summary/ship.json").read_text())
    assert shipped["test"]["gain_images"] == [0, 0]
    assert shipped["verdict"]["kind"] == "untested" and shipped["ship"] == "student_baseline"
    text = " ".join(html.split())
    assert render_macro("ship_sentence", shipped).split()[0] in text
    assert "a paired test needs at least 3 seeds" in text


def test_a_shared_teacher_is_shown_as_one_model(equal_gain_run):
    workdir, _ = equal_gain_run
    arms = pd.read_csv(workdir / "results/summary/arms.csv").set_index("arm")
    assert arms.loc["teacher", "n"] == 1 and bool(arms.loc["teacher", "shared"])
    assert pd.isna(arms.loc["teacher", "accuracy_sd"])
    assert pd.isna(arms.loc["teacher", "accuracy_ci_low"])
    assert arms.loc["lightnn/ce", "n"] == 2
    text = " ".join((workdir / "results/report.html").read_text().split())
    assert 'id="one-teacher"' in text and "n = 2" not in text.split('id="one-teacher"')[1][:200]
    assert "1 (shared by 2 seeds)" in text
    assert "conditional on this teacher" in text
    # One model timed once, however many seeds it teaches.
    latency = pd.read_csv(workdir / "results/summary/latency.csv")
    assert "results/teacher/export.json" in set(latency["key"])
    assert not latency["key"].str.contains("seed./teacher").any()
