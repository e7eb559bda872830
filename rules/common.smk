# Config validation, the study's expansion and the few helpers the rules
# share. No workflow logic.

import sys

sys.path.insert(0, workflow.basedir)

from kdflow import KdflowError, study
from kdflow.config import validate as _validate_config
from kdflow.data import dataset_spec

try:
    config.update(_validate_config(config))
except KdflowError as e:
    raise WorkflowError(str(e)) from None

SEEDS = config["seeds"]
# Every model of a seed, by its path under results/seed{seed}/ (kdflow.study):
# teacher, {student}/ce, {student}/{method}/{setting}.
ARMS = [a.path for a in study.arms(config)]

DATA = config["data"]["dataset"]
ARCHIVE = f"results/data/{dataset_spec(DATA).archive}"
DATASET = f"results/data/{DATA}.npz"
SPLIT = "results/data/split.npz"
# One teacher per seed; its training-set logits are shared by the logit-based
# students of that seed.
TEACHER = "results/seed{seed}/teacher/model.pt"
TEACHER_LOGITS = "results/seed{seed}/teacher/train_logits.pt"


wildcard_constraints:
    seed=r"\d+",
    student=r"[A-Za-z0-9_]+",
    method="|".join(study.METHODS),
    setting=r"[A-Za-z0-9_.+-]+",
    # An arm spans one to three path segments (see ARMS).
    arm=r"teacher|[A-Za-z0-9_]+/ce|[A-Za-z0-9_]+/("
    + "|".join(study.METHODS)
    + r")/[A-Za-z0-9_.+-]+",


def teacher_of(wildcards):
    """The teacher checkpoint of a student's seed (none for a teacher)."""
    if wildcards.arm == "teacher":
        return []
    return TEACHER.format(seed=wildcards.seed)


def cached_teacher_logits(wildcards):
    """The shared logits, for the students that can use them."""
    augment = config["student"]["augment"]
    if wildcards.method in ("kd", "dkd") and not (augment["crop"] or augment["flip"]):
        return TEACHER_LOGITS.format(seed=wildcards.seed)
    return []


def figure(name):
    """A figure of the report, also registered for `snakemake --report`."""
    return report(
        f"results/figures/{name}.png",
        caption=f"../report/{name}.rst",
        category="Figures",
    )


def per_model(pattern):
    """`pattern` for every seed x arm, in one fixed order shared by all inputs."""
    return expand(pattern, seed=SEEDS, arm=ARMS)
