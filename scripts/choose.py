# Records the selection stage's choice (kdflow.distill.study.write_choice).
from kdflow.workflow.cli import run_step
from kdflow.distill.study import write_choice

run_step(
    snakemake.log[0],
    lambda: write_choice(
        list(snakemake.input.checkpoints), snakemake.params.runs, snakemake.output.choice
    ),
)
