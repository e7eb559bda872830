from kdflow.workflow.cli import run_step
from kdflow.data.arrays import write_subset

run_step(
    snakemake.log[0],
    lambda: write_subset(
        snakemake.input[0],
        snakemake.output[0],
        train=snakemake.params.train,
        test=snakemake.params.test,
        seed=snakemake.params.seed,
    ),
)
