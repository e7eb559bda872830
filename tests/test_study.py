"""Studies: config lists -> jobs, staleness per setting, every method and
CIFAR-100 end to end through Snakemake on tiny archives."""

import json
import re
import subprocess

import pandas as pd
import pytest
import torch
import yaml

from kdflow import KdflowError
from kdflow.study import planner
from kdflow.workflow.config import validate
from tests.helpers.hostile import make_tree
from tests.helpers.workflow import (REPO, SNAKEMAKE, base_config, deep_update, local_env,
                                    planned_jobs, snakemake)


# ---------------------------------------------------------------------------
# Expansion of the config (no Snakemake)
# ---------------------------------------------------------------------------

def names(c):
    return [(m, s) for m, s, _ in planner.settings(c)]


def test_settings_expand_each_method_over_the_values_it_uses():
    c = validate({"kd": {"method": ["kd", "dkd", "dist", "cosine", "hint"],
                         "temperature": [1, 4], "soft_target_weight": [0.25, 0.5]}})
    assert names(c) == [
        ("kd", "T1_w0.25"), ("kd", "T1_w0.5"), ("kd", "T4_w0.25"), ("kd", "T4_w0.5"),
        ("dkd", "T1"), ("dkd", "T4"), ("dist", "T1"), ("dist", "T4"),
        ("cosine", "w0.25"), ("cosine", "w0.5"), ("hint", "w0.25"), ("hint", "w0.5")]


def test_any_knob_of_a_method_can_be_swept():
    c = validate({"kd": {"method": ["kd", "dkd", "dist"], "standardize": [False, True],
                         "dkd": {"beta": [8, 2]}, "dist": {"beta": [1, 2], "gamma": [1, 3]}}})
    assert names(c) == [
        ("kd", "T2_w0.25"), ("kd", "T2_w0.25_ls"),
        ("dkd", "T2"), ("dkd", "T2_ls"), ("dkd", "T2_b2"), ("dkd", "T2_b2_ls"),
        ("dist", "T2"), ("dist", "T2_g3"), ("dist", "T2_b2"), ("dist", "T2_b2_g3")]
    # Names show a non-primary knob only away from its schema default, so
    # sweeping a new knob keeps the existing settings' names and results.
    assert ("kd", "T2_w0.25") in names(validate({}))


def test_plan_records_hold_exactly_their_own_setting():
    c = validate({"student": {"model": ["lightnn", "resnet8"]},
                  "kd": {"method": ["kd", "dkd"], "temperature": [1, 4],
                         "soft_target_weight": [0.25, 0.5], "dkd": {"beta": 2.0}}})
    arms = planner.plan(c)
    paths = [a.path for a in arms]
    assert paths[0] == "teacher"
    assert [p for p in paths if p.endswith("/ce")] == ["lightnn/ce", "resnet8/ce"]
    assert len(paths) == 1 + 2 * (1 + 4 + 2)
    kd = planner.lookup(c, "resnet8/kd/T4_w0.5")
    assert (kd.role, kd.model, kd.method, kd.setting) == ("student_kd", "resnet8", "kd", "T4_w0.5")
    assert kd.values == {"temperature": 4.0, "soft_target_weight": 0.5, "ce_weight": None,
                         "standardize": False}
    # A knob added later stays out of the record (a job's params) at its
    # default, so results made before it existed stay fresh.
    assert kd.record()["values"] == {"temperature": 4.0, "soft_target_weight": 0.5,
                                     "standardize": False}
    assert kd.training == {**c["student"], "model": "resnet8"}
    dkd = planner.lookup(c, "lightnn/dkd/T1_b2")
    assert dkd.values == {"temperature": 1.0, "dkd.alpha": 1.0, "dkd.beta": 2.0,
                          "dkd.warmup_epochs": 20, "standardize": False}
    assert planner.lookup(c, "teacher").training == c["teacher"]
    # Records are plain data: a job's parameter, stored in checkpoints.
    for arm in arms:
        record = json.loads(json.dumps(arm.record()))
        assert planner.Arm.from_record(record).record() == arm.record()
    with pytest.raises(KdflowError, match="not a model of this config's study"):
        planner.lookup(c, "lightnn/kd/T3_w0.25")


def test_no_path_is_parsed_back_into_values():
    """Values go from the config into records, never from a name into a
    number: no setting regex or parser is left anywhere in the code."""
    code = [p for d in ("kdflow", "scripts", "rules") for p in (REPO / d).rglob("*")
            if p.suffix in (".py", ".smk")] + [REPO / "Snakefile"]
    for path in code:
        text = path.read_text()
        assert "parse_setting" not in text and "_SETTING" not in text, path
        assert not re.search(r"split\(\"_\"\)|re\.compile\(r\"\^\(\?:T", text), path


# ---------------------------------------------------------------------------
# The DAG of a study
# ---------------------------------------------------------------------------

def grid(archive, md5, **change):
    """2 temperatures x 2 soft-target weights x 2 seeds of vanilla KD."""
    return deep_update(base_config(archive, md5),
                       {"kd": {"temperature": [1.0, 4.0], "soft_target_weight": [0.25, 0.5]},
                        **change})


def test_study_dry_runs_to_one_teacher_and_baseline_and_four_students_per_seed(
        tmp_path, tiny_archive):
    jobs = planned_jobs(tmp_path, grid(*tiny_archive))
    assert jobs == {"download": 1, "convert": 1, "split": 1,
                    "train_teacher": 2, "teacher_logits": 2,
                    "train_student_baseline": 2, "train_student_kd": 8,
                    "evaluate": 2 * (1 + 1 + 4), "aggregate": 1, "report": 1, "all": 1}


# Every method, two temperatures, kd and dkd with and without logit
# standardization, one seed: a real run. One soft-target weight: sweeping
# the weight is the same expansion as sweeping T (the dry runs above and
# test_changing_one_temperature_reruns_only_its_jobs show it), and each
# setting here is a training and an evaluation job.
METHODS_CONFIG = {
    "seeds": [0],
    "kd": {"method": ["kd", "dkd", "dist", "cosine", "hint"], "temperature": [1.0, 2.0],
           "soft_target_weight": 0.5, "standardize": [False, True],
           "dkd": {"warmup_epochs": 1}},
}
# kd: 2 T x 2 ls; dkd: 2 T x 2 ls; dist: 2 T; cosine, hint: one each.
N_DISTILLED = 4 + 4 + 2 + 1 + 1


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, tiny_archive):
    workdir = tmp_path_factory.mktemp("study")
    config = deep_update(base_config(*tiny_archive), METHODS_CONFIG)
    snakemake(workdir, config)
    return workdir, config


def test_every_method_trains_and_is_evaluated(study_run):
    workdir, config = study_run
    arms = [a.path for a in planner.plan(validate(config))]
    assert len(arms) == 1 + 1 + N_DISTILLED
    base = torch.load(workdir / "results/seed0/lightnn/ce/model.pt", weights_only=True)
    for arm in arms:
        m = json.loads((workdir / f"results/seed0/{arm}/metrics.json").read_text())
        assert 0 <= m["accuracy"] <= 1 and m["arm"] == arm
        ckpt = torch.load(workdir / f"results/seed0/{arm}/model.pt", weights_only=True)
        if arm != "teacher":
            # The hint regressor is trained with the student and not kept.
            assert ckpt["state_dict"].keys() == base["state_dict"].keys()
            assert not torch.equal(ckpt["state_dict"]["features.0.weight"],
                                   base["state_dict"]["features.0.weight"]) or arm.endswith("ce")
    log = (workdir / "results/logs/seed0/lightnn/hint/w0.5/train.log").read_text()
    assert "distillation: hint, soft_target_weight 0.5" in log
    log = (workdir / "results/logs/seed0/lightnn/kd/T2_w0.5_ls/train.log").read_text()
    assert "standardize True" in log
    # Logit-only methods (kd, dkd, dist) learn from the seed's shared teacher
    # logits; feature methods run the teacher online.
    assert (workdir / "results/seed0/teacher/train_logits.pt").is_file()


def test_study_table_selects_on_validation(study_run):
    workdir, _ = study_run
    t = pd.read_csv(workdir / "results/summary/study.csv")
    assert len(t) == N_DISTILLED and t["chosen"].sum() == 1
    chosen = t[t["chosen"]].iloc[0]
    assert chosen["val_accuracy_mean"] == t["val_accuracy_mean"].max()
    best = t[t["best_of_method"]]
    assert sorted(best["method"]) == ["cosine", "dist", "dkd", "hint", "kd"]
    # Every knob is a column, read from the models' records.
    kd = t[t["arm"] == "lightnn/kd/T1_w0.5_ls"].iloc[0]
    assert (kd["temperature"], kd["soft_target_weight"], kd["standardize"]) == (1.0, 0.5, True)
    assert t.loc[t["method"] == "dist", "dist.gamma"].tolist() == [1.0, 1.0]
    assert best.sort_values("method_rank")["val_accuracy_mean"].is_monotonic_decreasing
    head = json.loads((workdir / "results/summary/headline.json").read_text())
    assert head["arms"]["student_kd"] == chosen["arm"]
    assert head["distilled_settings"] == N_DISTILLED
    html = (workdir / "results/report.html").read_text()
    assert 'id="study-table"' in html and 'id="ranking"' in html and "(chosen)" in html


def test_changing_one_temperature_reruns_only_its_jobs(study_run):
    workdir, config = study_run
    changed = deep_update(config, {"kd": {"temperature": [1.0, 3.0]}})
    # T=3 is new for kd (two ls), dkd (two ls) and dist; T=1 and the
    # feature methods stay.
    assert planned_jobs(workdir, changed) == {
        "train_student_kd": 5, "evaluate": 5, "aggregate": 1, "report": 1, "all": 1}


def test_changing_a_dkd_parameter_reruns_only_dkd(study_run):
    workdir, config = study_run
    changed = deep_update(config, {"kd": {"dkd": {"beta": 4.0}}})
    assert planned_jobs(workdir, changed) == {
        "train_student_kd": 4, "evaluate": 4, "aggregate": 1, "report": 1, "all": 1}


def test_sweeping_a_new_knob_keeps_the_existing_settings(study_run):
    """DIST's gamma goes from one value to two: only the new settings train."""
    workdir, config = study_run
    changed = deep_update(config, {"kd": {"dist": {"gamma": [1.0, 2.0]}}})
    assert planned_jobs(workdir, changed) == {
        "train_student_kd": 2, "evaluate": 2, "aggregate": 1, "report": 1, "all": 1}


def test_a_ce_weight_reruns_only_the_methods_that_use_it(study_run):
    """ce_weight [default, 1]: kd (4 settings), cosine and hint (1 each) gain
    a twin with CE weight 1; dkd, dist and every existing setting stay."""
    workdir, config = study_run
    changed = deep_update(config, {"kd": {"ce_weight": [None, 1.0]}})
    assert planned_jobs(workdir, changed) == {
        "train_student_kd": 6, "evaluate": 6, "aggregate": 1, "report": 1, "all": 1}


def test_adding_confirm_seeds_to_a_finished_study_plans_the_choice(study_run):
    """confirm_seeds added after a selection-only run: the choice, the new
    seed's teacher and plain student, then aggregate and report (the chosen
    settings join once the choice is made). Snakemake once planned only the
    report, from the aggregate's old numbers: waiting on the unmade choice hid
    the aggregate's changed params and inputs."""
    workdir, config = study_run
    assert planned_jobs(workdir, deep_update(config, {"confirm_seeds": [1]})) == {
        "choose": 1, "train_teacher": 1, "train_student_baseline": 1, "evaluate": 2,
        "aggregate": 1, "report": 1, "all": 1}


# ---------------------------------------------------------------------------
# CIFAR-100 with BatchNorm models
# ---------------------------------------------------------------------------

def test_cifar100_runs_end_to_end(tmp_path, tiny_archive_100):
    archive, md5 = tiny_archive_100
    config = deep_update(base_config(archive, md5), {
        "data": {"dataset": "cifar100", "val_size": 100},
        "seeds": [0],
        "teacher": {"model": "resnet14", "optimizer": "sgd", "lr": 0.05,
                    "weight_decay": 5e-4, "lr_milestones": [1], "epochs": 2,
                    "augment": {"crop": 4, "flip": True}},
        "student": {"model": "resnet8", "optimizer": "sgd", "lr": 0.05},
        "kd": {"method": ["kd", "hint"], "temperature": 4.0, "soft_target_weight": 0.9},
    })
    snakemake(tmp_path, config)
    res = tmp_path / "results"
    assert (res / "data" / "cifar100.npz").is_file()
    m = json.loads((res / "seed0/resnet8/kd/T4_w0.9/metrics.json").read_text())
    assert len(m["classes"]) == 100 and m["test_images"] == 200
    assert m["classes"][0] == "class_00"
    h = pd.read_csv(res / "seed0/teacher/history.csv")
    assert h["lr"].tolist() == pytest.approx([0.05, 0.005])  # x0.1 after epoch 1
    assert (res / "report.html").is_file()


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------

PRESETS = REPO / "config" / "presets"


def dry_run_preset(workdir, preset):
    """`snakemake -n --configfile config/presets/<preset>`, as a user runs it."""
    proc = subprocess.run(
        [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "-n",
         "--quiet", "rules", "--cores", "2", "--resources", "gpu=1",
         "--configfile", str(PRESETS / preset)],
        capture_output=True, text=True, timeout=300, env=local_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (proc.stdout + proc.stderr).split("Job stats:", 1)[1]
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_tutorial_preset_is_the_default(tmp_path):
    jobs = dry_run_preset(tmp_path, "tutorial.yaml")
    jobs.pop("total")
    assert jobs == planned_jobs(tmp_path, {})


@pytest.mark.parametrize("preset,teacher,student", [
    ("repdistiller_cifar100_resnet32x4_resnet8x4.yaml", "resnet32x4", "resnet8x4"),
    ("repdistiller_cifar100_wrn_40_2_wrn_16_2.yaml", "wrn_40_2", "wrn_16_2"),
])
def test_repdistiller_presets_dry_run(tmp_path, preset, teacher, student):
    jobs = dry_run_preset(tmp_path, preset)
    assert jobs["train_teacher"] == 3 and jobs["train_student_kd"] == 3
    c = validate(yaml.safe_load((PRESETS / preset).read_text()))
    assert c["data"]["dataset"] == "cifar100"
    assert c["data"]["md5"] == "eb9058c3a382ffc7106e4002c42a8d85"
    for section, model in (("teacher", teacher), ("student", student)):
        s = c[section]
        assert s["model"] == model and (s["epochs"], s["batch_size"], s["lr"]) == (240, 64, 0.05)
        assert (s["optimizer"], s["momentum"], s["weight_decay"]) == ("sgd", 0.9, 5e-4)
        assert s["lr_milestones"] == [150, 180, 210] and s["augment"] == {"crop": 4, "flip": True, "resized_crop": None}
    assert (c["kd"]["temperature"], c["kd"]["soft_target_weight"]) == (4.0, 0.9)


def test_the_224_pixel_fine_tuning_preset_dry_runs_on_a_folder(tmp_path):
    # The preset with a user's tree, as its header says to run it.
    tree = make_tree(tmp_path / "tree", train=3, test=1, size=40)
    config = yaml.safe_load((PRESETS / "finetune_224.yaml").read_text())
    config["data"].update(dataset="folder", url=str(tree), val_size=10)
    c = validate(config)
    assert c["data"]["image_size"] == 224
    assert c["teacher"]["init"] == {"torchvision": "IMAGENET1K_V2"}
    assert c["student"]["init"] == {"torchvision": "IMAGENET1K_V1"}
    for section in ("teacher", "student"):
        assert c[section]["augment"]["resized_crop"] == {"scale": [0.08, 1.0],
                                                        "ratio": [0.75, 4 / 3]}
        assert c[section]["batch_size"] == 32 and c[section]["optimizer"] == "sgd"
    (tmp_path / "run").mkdir()
    jobs = planned_jobs(tmp_path / "run", config)
    assert jobs["fetch_teacher_init"] == 1 and jobs["fetch_student_init"] == 1
    assert jobs["train_teacher"] == 1 and jobs["train_student_kd"] == 3


# The authors' recipes: method, the one setting's name and values, published numbers.
RECIPES = [
    ("ls_kd_cifar100_resnet32x4_resnet8x4.yaml", "kd", "T2_w9_ce0.1_ls",
     {"temperature": 2.0, "soft_target_weight": 9.0, "ce_weight": 0.1, "standardize": True},
     {"student_kd": 76.62}),
    ("dist_cifar100_resnet32x4_resnet8x4.yaml", "dist", "T4_b2_g2",
     {"temperature": 4.0, "dist.beta": 2.0, "dist.gamma": 2.0},
     {"teacher": 79.42, "student_baseline": 72.5, "student_kd": 76.31}),
]


@pytest.mark.parametrize("preset,method,setting,values,published", RECIPES,
                         ids=[r[0] for r in RECIPES])
def test_authors_recipe_presets_dry_run(tmp_path, preset, method, setting, values, published):
    jobs = dry_run_preset(tmp_path, preset)
    assert jobs["train_teacher"] == 3 and jobs["train_student_kd"] == 3
    c = validate(yaml.safe_load((PRESETS / preset).read_text()))
    assert c["data"]["dataset"] == "cifar100" and c["data"]["val_size"] == 5000
    for section, model in (("teacher", "resnet32x4"), ("student", "resnet8x4")):
        s = c[section]
        assert s["model"] == model and (s["epochs"], s["batch_size"], s["lr"]) == (240, 64, 0.05)
        assert (s["optimizer"], s["momentum"], s["weight_decay"]) == ("sgd", 0.9, 5e-4)
        assert s["lr_milestones"] == [150, 180, 210] and s["augment"] == {"crop": 4, "flip": True, "resized_crop": None}
    assert planner.settings(c) == [(method, setting, values)]
    shown = {k: v for k, v in c["report"]["published"].items()
             if k not in ("source", "protocol") and v is not None}
    assert shown == published and c["report"]["published"]["source"]
    # The authors' protocol, so the report can say where this run's differs.
    assert c["report"]["published"]["protocol"] == {
        "train_images": 50000, "selected_on": "test", "teacher": "released"}
