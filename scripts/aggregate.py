from kdflow.aggregate import aggregate
from kdflow.cli import run_step

run_step(
    snakemake.log[0],
    lambda: aggregate(
        metrics=list(snakemake.input.metrics),
        histories=list(snakemake.input.histories),
        benchmarks=list(snakemake.input.benchmarks),
        checkpoints=list(snakemake.input.checkpoints),
        out=dict(snakemake.output.items()),
    ),
)
