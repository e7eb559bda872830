# Records the selection stage's choice (kdflow.study.write_choice).
from kdflow.cli import run_step
from kdflow.study import write_choice

run_step(
    snakemake.log[0],
    lambda: write_choice(
        list(snakemake.input.checkpoints), snakemake.params.runs, snakemake.output.choice
    ),
)
