# Records the selection stage's choice (kdflow.study.planner.write_choice).
from kdflow.workflow.cli import run_step
from kdflow.study.planner import write_choice

run_step(
    snakemake.log[0],
    lambda: write_choice(
        list(snakemake.input.checkpoints), snakemake.params.runs, snakemake.output.choice
    ),
)
