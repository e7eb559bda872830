# Config validation, the study's expansion and the few helpers the rules
# share. No workflow logic.

import os
import sys

from snakemake.logging import logger

sys.path.insert(0, workflow.basedir)

from kdflow import KdflowError
from kdflow.distill import methods
from kdflow.models import pretrained
from kdflow.study import planner
from kdflow.workflow.config import validate as _validate_config
from kdflow.data.datasets import (
    archive_name,
    directory_source,
    fingerprint,
    preprocessing_params,
)

try:
    config.update(_validate_config(config))
except KdflowError as e:
    raise WorkflowError(str(e)) from None

SEEDS = config["seeds"]
# Every model of a seed, by its path under results/seed{seed}/ (kdflow.study.planner):
# teacher, {student}/ce, {student}/{method}/{setting}. Jobs look their
# record up here by path; nothing is read back from a path's name.
PLAN = {a.path: a for a in planner.plan(config)}
ARMS = list(PLAN)
for _warning in planner.warnings(PLAN.values()):
    logger.warning(f"kdflow: {_warning}")
# The models evaluated per seed: all but a shared teacher, which is evaluated
# once (results/teacher/) and stands for the teacher of every seed.
SEED_ARMS = [a for a in ARMS if not (a == "teacher" and config["teacher"]["shared"])]
DISTILLED = planner.distilled_arms(config)
# Two-stage studies (kdflow.study.planner): the confirmation seeds train the teacher
# and plain students at once, and the chosen settings once the `choose`
# checkpoint has written CHOICE.
CONFIRM_SEEDS = config["confirm_seeds"]
CONFIRM_FIXED = [
    a.path for a in planner.confirmation_fixed_arms(config) if a.path in SEED_ARMS
]
CHOICE = "results/study/choice.json"

DATA = config["data"]["dataset"]
# The downloaded source (kdflow.data.datasets); None for an image folder read in
# place, which has no download step.
_archive = archive_name(DATA, config["data"]["url"])
ARCHIVE = f"results/data/{_archive}" if _archive else None
# ...whose directory the convert step reads instead ("" with an archive).
SOURCE_DIR = "" if ARCHIVE else directory_source(config["data"]["url"])
CONVERTED = f"results/data/{DATA}.npz"
# data.subset is drawn from the converted images by a step of its own, so
# changing it reruns only what follows conversion; without one the converted
# file is the dataset.
SUBSET = config["data"]["subset"]
DATASET = (
    f"results/data/{DATA}-subset.npz"
    if SUBSET["train"] or SUBSET["test"]
    else CONVERTED
)
SPLIT = "results/data/split.npz"
# The teacher: one per seed, or one shared by every seed (teacher.shared, and
# always for an imported teacher.checkpoint), trained with the first seed.
# Its training-set logits are shared by the logit-based students it teaches.
TEACHER_CFG = config["teacher"]
IMPORTED = TEACHER_CFG["checkpoint"] is not None
SHARED_TEACHER = TEACHER_CFG["shared"]
TEACHER_SEED = SEEDS[0]
# `where` of the teacher's files: results/<where>/teacher/, and the same
# under results/logs/ and results/benchmarks/.
TEACHER_AT = "" if SHARED_TEACHER else "seed{seed}/"
TEACHER = f"results/{TEACHER_AT}teacher/model.pt"
TEACHER_LOGITS = f"results/{TEACHER_AT}teacher/train_logits.pt"
# Downloaded weights (md5-verified): the imported teacher, or the initial
# weights of a fine-tuned one.
TEACHER_SOURCE = "results/teacher/source.pt"
TEACHER_INIT = "results/teacher/init.pt" if TEACHER_CFG["init"] else None
# The students' initial weights (student.init): one file per architecture,
# shared by its plain and distilled students of every seed.
STUDENT_INIT = (
    "results/students/{student}/init.pt" if config["student"]["init"] else None
)


def resolved_init(section, model):
    """A torchvision init name (teacher.init or student.init) for `model`:
    torchvision's name, URL and hash for it (kdflow.models.pretrained), in
    a fetch rule's params so that a torchvision release moving DEFAULT to
    other weights fetches them and reruns what follows."""
    return pretrained.resolve(config[section]["init"], model).record()


def student_init(wildcards):
    """A student's initial weights file (none without student.init)."""
    return STUDENT_INIT.format(student=wildcards.student) if STUDENT_INIT else []


wildcard_constraints:
    seed=r"\d+",
    student=r"[A-Za-z0-9_]+",
    method="|".join(methods.METHODS),
    setting=r"[A-Za-z0-9_.+-]+",
    # An arm spans one to three path segments (see ARMS).
    arm=r"teacher|[A-Za-z0-9_]+/ce|[A-Za-z0-9_]+/("
    + "|".join(methods.METHODS)
    + r")/[A-Za-z0-9_.+-]+",


def teacher_of(wildcards):
    """The teacher checkpoint of a student's seed (none for a teacher)."""
    if wildcards.arm == "teacher":
        return []
    return TEACHER.format(seed=wildcards.seed)


def job_seed(wildcards):
    """A training job's seed: its wildcard, or the first seed for a shared teacher."""
    return int(wildcards.seed) if "seed" in wildcards.keys() else TEACHER_SEED


def planned(path):
    """The plan record of the model at `path` (a job's `arm` parameter:
    role, training section, method and values)."""
    try:
        return PLAN[path]
    except KeyError:
        raise WorkflowError(
            f"results/seed*/{path} is not a model of this config's study; the config "
            f"plans: {', '.join(PLAN)}"
        ) from None


def student_arm(wildcards):
    """The path of a student job's model, from its wildcards."""
    if "method" in wildcards.keys():
        return f"{wildcards.student}/{wildcards.method}/{wildcards.setting}"
    return f"{wildcards.student}/ce"


def arm_record(wildcards):
    return planned(student_arm(wildcards)).record()


def cached_teacher_logits(wildcards):
    """The shared logits, for the students that can use them (decided by
    kdflow.distill.methods.caches_teacher_logits, as in the job)."""
    arm = planned(student_arm(wildcards))
    if methods.caches_teacher_logits(arm.method, arm.training["augment"]):
        return TEACHER_LOGITS.format(seed=wildcards.seed)
    return []


def figure(name):
    """A figure of the report, also registered for `snakemake --report`."""
    return report(
        f"results/figures/{name}.png",
        caption=f"../report/{name}.rst",
        category="Figures",
    )


# Every model's files that the aggregate reads, by kdflow.analysis.aggregate.MODEL_FILES key.
MODEL_PATTERNS = {
    "metrics": "results/seed{seed}/{arm}/metrics.json",
    "speed": "results/seed{seed}/{arm}/speed.json",
    "histories": "results/seed{seed}/{arm}/history.csv",
    "checkpoints": "results/seed{seed}/{arm}/model.pt",
    "train_benchmarks": "results/benchmarks/seed{seed}/{arm}/train.tsv",
    "eval_benchmarks": "results/benchmarks/seed{seed}/{arm}/evaluate.tsv",
    # The deployment record (rules/export.smk), unless export is off.
    **(
        {"exports": "results/seed{seed}/{arm}/export.json"}
        if config["export"]["enabled"]
        else {}
    ),
}


def per_model(pattern):
    """`pattern` for every model known before any choice (each selection
    seed x arm, then each confirmation seed's teacher and plain students),
    in one fixed order shared by all inputs. A shared teacher is not among
    them (SHARED_TEACHER_FILES)."""
    return expand(pattern, seed=SEEDS, arm=SEED_ARMS) + expand(
        pattern, seed=CONFIRM_SEEDS, arm=CONFIRM_FIXED
    )


# The shared teacher's files, by MODEL_FILES key, for the aggregate (which
# repeats its row for every seed); an imported teacher has no training
# history or training benchmark. Empty without a shared teacher.
SHARED_TEACHER_FILES = (
    {
        "metrics": "results/teacher/metrics.json",
        "speed": "results/teacher/speed.json",
        "histories": [] if IMPORTED else "results/teacher/history.csv",
        "checkpoints": TEACHER,
        "train_benchmarks": [] if IMPORTED else "results/benchmarks/teacher/train.tsv",
        "eval_benchmarks": "results/benchmarks/teacher/evaluate.tsv",
        **(
            {"exports": "results/teacher/export.json"}
            if config["export"]["enabled"]
            else {}
        ),
    }
    if SHARED_TEACHER
    else {}
)


def confirmed_models(pattern):
    """Input function: `pattern` for the chosen settings on the confirmation
    seeds, known once the `choose` checkpoint has run (none without
    confirmation seeds). Only the aggregate asks for these: no training rule
    takes the choice as an input, so rewriting it never retrains a model."""

    def inputs(wildcards):
        if not CONFIRM_SEEDS:
            return []
        if not os.path.exists(CHOICE):
            # No choice yet: do not ask the checkpoint. Asking it would make
            # Snakemake (9.x) skip the aggregate's params and input-set
            # checks until `choose` has run, and it runs a checkpoint whose
            # output is missing only for a job already due: with the
            # aggregate's outputs there (confirm_seeds added to a finished
            # run, or the choice deleted) nothing would be planned. The
            # aggregate's own CHOICE input orders it after `choose`, whose
            # end makes Snakemake evaluate this function again.
            return []
        chosen = planner.chosen_arms_of(checkpoints.choose.get().output.choice)
        return expand(pattern, seed=CONFIRM_SEEDS, arm=chosen)

    return inputs


# Deployment (rules/export.smk): the files of one model's export.
EXPORT = config["export"]
INT8 = "int8" in EXPORT["formats"]


def export_outputs(where):
    """The files of one model's export under results/<where>."""
    return {
        "record": f"results/{where}/export.json",
        "onnx": f"results/{where}/model.onnx",
        **({"int8": f"results/{where}/model.int8.onnx"} if INT8 else {}),
    }
