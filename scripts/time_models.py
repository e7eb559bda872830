# Times the models the report compares, together in one job (kdflow.deploy.timing).
from kdflow.workflow.cli import run_step
from kdflow.analysis.ship import time_compared

settings = snakemake.params.export
run_step(
    snakemake.log[0],
    lambda: time_compared(
        snakemake.input.exports,
        snakemake.input.headline,
        snakemake.output.latency,
        snakemake.output.samples,
        settings={k: settings[k] for k in ("batch", "warmup", "runs", "rounds")},
        threads=settings["threads"] or snakemake.threads,
    ),
)
