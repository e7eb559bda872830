"""Two-stage studies: settings chosen on selection seeds, the choice
confirmed on seeds of its own (confirm_seeds): refused configs, the plan
before and after the choice, the headline from the confirmation seeds only,
and what a changed seed or setting reruns, run for real through Snakemake."""

import json

import pandas as pd
import pytest

from kdflow import KdflowError
from kdflow.workflow.config import validate
from tests.helpers.workflow import base_config, deep_update, planned_jobs, snakemake

# Seeds out of order on purpose: the choose step and the aggregate must
# still choose alike (they once summed validation accuracies in different
# orders and disagreed on ties, failing the run for good).
SELECT, CONFIRM = [2, 0, 1], [3, 4, 5]


def two_stage(archive, md5, temperatures=(1.0, 4.0)):
    """2 T x 2 w of KD, chosen on seeds 0-2 and confirmed on seeds 3-5. At
    w = 0 the temperature changes nothing, so T1_w0 and T4_w0 are the same
    model and tie exactly on validation, on every seed."""
    return deep_update(base_config(archive, md5), {
        "seeds": SELECT, "confirm_seeds": CONFIRM,
        "kd": {"temperature": list(temperatures), "soft_target_weight": [0.0, 0.5]}})


def test_confirm_seeds_must_not_overlap_the_selection_seeds():
    with pytest.raises(KdflowError, match=r"confirm_seeds and seeds share \[2\]"):
        validate({"seeds": [0, 1, 2], "confirm_seeds": [2, 3],
                  "kd": {"temperature": [1, 2]}})


def test_confirm_seeds_need_a_choice_to_confirm():
    with pytest.raises(KdflowError, match="only one distillation setting"):
        validate({"confirm_seeds": [3, 4]})


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory, tiny_archive):
    """Selection stage first (up to the choice), then the whole workflow;
    returns (workdir, config, jobs planned once the choice existed)."""
    workdir = tmp_path_factory.mktemp("two_stage")
    config = two_stage(*tiny_archive)
    snakemake(workdir, config, "--until", "choose")
    after = planned_jobs(workdir, config)
    snakemake(workdir, config)
    return workdir, config, after


def test_two_stage_study_dry_runs_before_the_choice(tmp_path, tiny_archive):
    # Before the choice: the selection stage in full, and on the confirmation
    # seeds what does not depend on the choice (teacher, plain student).
    assert planned_jobs(tmp_path, two_stage(*tiny_archive)) == {
        "download": 1, "convert": 1, "split": 1,
        "train_teacher": 3 + 3, "teacher_logits": 3, "train_student_baseline": 3 + 3,
        "train_student_kd": 3 * 4, "evaluate": 3 * (1 + 1 + 4) + 3 * 2,
        "choose": 1, "aggregate": 1, "report": 1, "all": 1}


def test_two_stage_study_plans_the_confirmation_once_the_choice_exists(two_stage_run):
    _, _, after = two_stage_run
    # The choice made (`--until choose` trained only what it needs), the
    # confirmation seeds add the chosen setting and the teacher's logits it
    # reads; the plain students and every evaluation are still due.
    assert after == {
        "train_teacher": 3, "teacher_logits": 3, "train_student_baseline": 3 + 3,
        "train_student_kd": 3, "evaluate": 3 * (1 + 1 + 4) + 3 * 3,
        "aggregate": 1, "report": 1, "all": 1}


def test_headline_uses_the_confirmation_seeds_only(two_stage_run):
    workdir, _, _ = two_stage_run
    res = workdir / "results"
    choice = json.loads((res / "study/choice.json").read_text())
    arm = choice["students"]["lightnn"]["arm"]
    head = json.loads((res / "summary/headline.json").read_text())
    assert head["stage"] == "confirmation" and head["seeds"] == CONFIRM
    assert head["selection_seeds"] == sorted(SELECT) and not head["optimistic"]
    assert head["arms"]["student_kd"] == arm

    def acc(seed, a):
        return json.loads((res / f"seed{seed}/{a}/metrics.json").read_text())["accuracy"]

    kd = [acc(s, arm) for s in CONFIRM]
    ce = [acc(s, "lightnn/ce") for s in CONFIRM]
    teacher = [acc(s, "teacher") for s in CONFIRM]
    assert head["student_kd_mean"] == pytest.approx(sum(kd) / 3, abs=1e-12)
    assert head["student_baseline_mean"] == pytest.approx(sum(ce) / 3, abs=1e-12)
    assert head["teacher_mean"] == pytest.approx(sum(teacher) / 3, abs=1e-12)
    assert head["gain_mean"] == pytest.approx((sum(kd) - sum(ce)) / 3, abs=1e-12)
    # Only the chosen setting was trained on the confirmation seeds.
    for s in CONFIRM:
        trained = sorted(p.parent.relative_to(res / f"seed{s}").as_posix()
                         for p in (res / f"seed{s}").rglob("model.pt"))
        assert trained == sorted(["teacher", "lightnn/ce", arm])
    # The report shows those numbers and says where they come from.
    html = (res / "report.html").read_text()
    assert f"{100 * head['gain_mean']:+.2f} pts" in html
    assert 'id="stage"' in html and "confirmation seeds" in html
    t = pd.read_csv(res / "summary/study.csv")
    assert set(t["n"]) == {3}  # the study table: selection seeds only
    chosen = t[t["chosen_for_student"]].iloc[0]
    assert chosen["arm"] == arm and chosen["confirm_n"] == 3
    assert chosen["confirm_gain_mean"] == pytest.approx(head["gain_mean"], abs=1e-12)
    # The choice: highest mean validation accuracy over the selection seeds.
    assert chosen["val_accuracy_mean"] == t["val_accuracy_mean"].max()
    # The w = 0 pair ties exactly (same model), and a tie goes to the
    # setting planned first (config order: T1 before T4).
    cand = {c["arm"]: c for c in choice["candidates"]}
    t1, t4 = cand["lightnn/kd/T1_w0"], cand["lightnn/kd/T4_w0"]
    assert t1["val_correct"] == t4["val_correct"]
    assert arm != "lightnn/kd/T4_w0"
    assert {"p_value", "p_value_holm", "perm_p_value"} <= set(t.columns)
    assert (t["p_value_holm"].dropna() >= t.loc[t["p_value_holm"].notna(), "p_value"]).all()


def test_changing_the_confirm_seeds_plans_the_choice_and_only_their_models(two_stage_run):
    workdir, config, _ = two_stage_run
    choice = workdir / "results/study/choice.json"
    # Deleted, the choice is made again (aggregate and report follow); no
    # model reads it, so none retrains. (Snakemake once planned nothing:
    # the aggregate's outputs were there and its wait for the unmade choice
    # hid its changed inputs.)
    kept = choice.with_name("choice.json.kept")
    choice.rename(kept)
    try:
        assert planned_jobs(workdir, config) == {
            "choose": 1, "aggregate": 1, "report": 1, "all": 1}
    finally:
        kept.rename(choice)
    # A confirmation seed swapped for another: that seed's models, the chosen
    # setting among them; the choice stands.
    swapped = deep_update(config, {"confirm_seeds": [3, 4, 6]})
    assert planned_jobs(workdir, swapped) == {
        "train_teacher": 1, "teacher_logits": 1, "train_student_baseline": 1,
        "train_student_kd": 1, "evaluate": 3, "aggregate": 1, "report": 1, "all": 1}
    # Without confirm_seeds: the selection-only headline, from what is there.
    assert planned_jobs(workdir, {k: v for k, v in config.items()
                                  if k != "confirm_seeds"}) == {
        "aggregate": 1, "report": 1, "all": 1}


def test_changing_a_setting_that_is_not_chosen_retrains_no_confirmation_model(
        two_stage_run, tmp_path):
    workdir, config, _ = two_stage_run
    res = workdir / "results"
    chosen = json.loads((res / "study/choice.json").read_text())["students"]["lightnn"]["arm"]
    chosen_t = json.loads((res / f"seed0/{chosen}/metrics.json").read_text()
                          )["plan"]["values"]["temperature"]
    other = next(t for t in config["kd"]["temperature"] if t != chosen_t)
    stamps = {p: p.stat().st_mtime_ns
              for s in CONFIRM for p in (res / f"seed{s}").rglob("model.pt")}
    # The rules of the confirmation models do not read the choice: before the
    # choice is made again, no confirmation training is planned.
    changed = deep_update(config, {"kd": {"temperature": [chosen_t, other + 2.0]}})
    jobs = planned_jobs(workdir, changed)
    assert jobs["train_student_kd"] == 3 * 2 and jobs["choose"] == 1
    assert "train_teacher" not in jobs and "train_student_baseline" not in jobs
    snakemake(workdir, changed)
    after = json.loads((res / "study/choice.json").read_text())["students"]["lightnn"]["arm"]
    for path, stamp in stamps.items():
        # Teachers and plain students of the confirmation seeds never rerun;
        # the chosen setting's only if the new setting won the choice.
        rerun = path.stat().st_mtime_ns != stamp if path.exists() else True
        if "/kd/" not in path.as_posix() or after == chosen:
            assert not rerun, path
