# Config validation and the few helpers the rules share. No workflow logic.

import sys

sys.path.insert(0, workflow.basedir)

from kdflow import KdflowError
from kdflow.config import validate as _validate_config

try:
    config.update(_validate_config(config))
except KdflowError as e:
    raise WorkflowError(str(e)) from None

SEEDS = config["seeds"]
STUDENT_ARMS = ["student_baseline", "student_kd"]
ARMS = ["teacher"] + STUDENT_ARMS

DATASET = "results/data/cifar10.npz"
SPLIT = "results/data/split.npz"


wildcard_constraints:
    seed=r"\d+",
    arm="|".join(ARMS),


def teacher_of(wildcards):
    """The teacher checkpoint of a student's seed (none for a teacher)."""
    if wildcards.arm == "teacher":
        return []
    return f"results/seed{wildcards.seed}/teacher/model.pt"


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
