"""An honest verdict: two-stage studies, diverged and chance-level runs,
independent random streams, twins that stay twins, provenance per commit."""

import json

import pandas as pd
import pytest
import torch

from kdflow import KdflowError
from kdflow.distill import methods
from kdflow.core import streams
from kdflow.workflow.config import validate
from kdflow.models.zoo import build_model
from tests.helpers.workflow import base_config, deep_update, planned_jobs, report_tables, snakemake

# ---------------------------------------------------------------------------
# Two-stage studies
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Diverged and chance-level runs
# ---------------------------------------------------------------------------

def one_seed(archive, md5, teacher_lr):
    return deep_update(base_config(archive, md5),
                       {"seeds": [0], "teacher": {"lr": teacher_lr}})


@pytest.fixture(scope="module")
def chance_run(tmp_path_factory, tiny_archive):
    """A teacher that cannot learn (Adam at lr 1e-30: its weights never move,
    so it predicts one class) and its students, run for real."""
    workdir = tmp_path_factory.mktemp("chance")
    config = one_seed(*tiny_archive, 1e-30)
    snakemake(workdir, config)
    return workdir, config


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


def test_report_lists_every_commit_and_warns_on_more_than_one(chance_run, tmp_path):
    from kdflow.analysis.report import render_report

    workdir, config = chance_run
    summary = workdir / "results/summary"
    tables = report_tables(summary)
    one = tmp_path / "one.html"
    render_report(tables, str(one), "t", validate(config))
    assert 'id="commits-warning"' not in one.read_text()
    prov = pd.read_csv(summary / "provenance.csv")
    prov.loc[0, "kdflow_commit"] = "0123456789abcdef0123456789abcdef01234567"
    prov.to_csv(tmp_path / "provenance.csv", index=False)
    tables["provenance"] = str(tmp_path / "provenance.csv")
    two = tmp_path / "two.html"
    render_report(tables, str(two), "t", validate(config))
    html = two.read_text()
    assert 'id="commits-warning"' in html and "2 different" in html
    listed = html.split('id="commits"', 1)[1].split("</table>", 1)[0]
    assert "0123456789abcdef" in listed
    assert str(pd.read_csv(summary / "provenance.csv")["kdflow_commit"].iloc[1]) in listed


# ---------------------------------------------------------------------------
# Random streams and twins
# ---------------------------------------------------------------------------

def test_every_seed_and_purpose_has_its_own_stream():
    firsts = {}
    for seed in range(10):
        for purpose in streams.PURPOSES:
            g = streams.generator(seed, purpose)
            firsts[(seed, purpose)] = tuple(torch.randint(0, 2 ** 31, (4,), generator=g).tolist())
    assert len(set(firsts.values())) == len(firsts) == 10 * len(streams.PURPOSES)
    # Stable: the same (seed, purpose) always gives the same stream.
    assert streams.stream_seed(3, "order") == streams.stream_seed(3, "order")


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_building_a_method_leaves_the_global_random_state_alone(method):
    from kdflow.distill import study
    from kdflow.workflow.config import validate

    arm = next(a for a in study.plan(validate({"kd": {"method": method}}))
               if a.role == "student_kd")
    student, teacher = build_model("lightnn"), build_model("deepnn").eval()
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def build():
        return methods.build(method, arm.values, methods.BuildContext(
            student, teacher, "cpu", streams.generator(0, "method"), (3, 32, 32)))

    m = build()
    assert torch.equal(torch.get_rng_state(), cpu)
    if cuda is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda))
    if m.extra is not None:  # the regressor's weights come from its own stream
        again = build()
        assert all(torch.equal(a, b) for a, b in
                   zip(m.extra.state_dict().values(), again.extra.state_dict().values()))


def test_plain_and_distilled_twins_draw_the_same_dropout_masks(workflow_run, tmp_path,
                                                                monkeypatch):
    import kdflow.train.job as train_module

    workdir, _ = workflow_run
    data = workdir / "results/data"
    masks: dict[str, list] = {}
    real_build = train_module.build_model

    def recording_build(name, *args):
        model = real_build(name, *args)
        if name == "lightnn":
            store = masks.setdefault(current, [])
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.register_forward_hook(
                        lambda mod, inp, out: store.append((out == 0) & (inp[0] != 0))
                        if mod.training and len(store) < 1 else None)
        return model

    monkeypatch.setattr(train_module, "build_model", recording_build)
    teacher = str(workdir / "results/seed0/teacher/model.pt")
    cfg = validate({"student": {"model": "lightnn", "epochs": 1, "batch_size": 32},
                    "engine": {"deterministic": True}})
    common = dict(dataset=str(data / "cifar10.npz"), split=str(data / "split.npz"), seed=0,
                  device="cpu", threads=1, teacher=teacher, engine=cfg["engine"])
    from kdflow.distill import study
    config = validate({"student": {"model": "lightnn", "epochs": 1, "batch_size": 32},
                       "kd": {"method": ["hint", "kd"], "soft_target_weight": 0.5}})
    for current, path in (("plain", "lightnn/ce"), ("hint", "lightnn/hint/w0.5"),
                          ("kd", "lightnn/kd/T2_w0.5")):
        out = tmp_path / current
        out.mkdir()
        train_module.train(study.lookup(config, path).record(), out_model=str(out / "model.pt"),
                           out_history=str(out / "history.csv"), **common)
    assert masks["plain"] and masks["plain"][0].any()
    for twin in ("hint", "kd"):
        assert torch.equal(masks[twin][0], masks["plain"][0]), twin

