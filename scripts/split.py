from kdflow.workflow.cli import run_step
from kdflow.data.arrays import write_split

run_step(
    snakemake.log[0],
    lambda: write_split(
        snakemake.input[0],
        snakemake.output[0],
        val_size=snakemake.params.val_size,
        seed=snakemake.params.seed,
    ),
)
