# kdflow: knowledge distillation on CIFAR-10, CIFAR-100 or image folders, reproducibly.
# Rules are declared in rules/*.smk; the work is done by the `kdflow` library
# through thin scripts in scripts/. Config reference: config/schema.yaml.

import os
import sys

from snakemake.utils import min_version

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


report: "report/workflow.rst"


# Scripts import the kdflow library from this checkout, also inside conda
# environments and on cluster nodes (which re-read this file). Set, not
# extended: a user's PYTHONPATH must not shadow the checkout's library.
os.environ.update(PYTHONPATH=workflow.basedir)

# A job that a cluster executor submitted (SLURM: sbatch, then srun) runs in
# a Snakemake of mode "remote" and on the GPUs the scheduler gave it, so
# kdflow.core.gpu takes no slot there; a local run inside a SLURM allocation
# (salloc, or snakemake in an sbatch script) shares the allocation's GPUs
# through slots. Set on every start, never inherited.
sys.path.insert(0, workflow.basedir)
from kdflow.core.gpu import CLUSTER_JOB_ENV

os.environ[CLUSTER_JOB_ENV] = "1" if workflow.remote_exec else ""


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/study.smk"
include: "rules/evaluate.smk"
include: "rules/export.smk"
include: "rules/report.smk"
include: "rules/ship.smk"


rule all:
    default_target: True
    input:
        rules.report.output.html,
