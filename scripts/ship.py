# What you would ship: ship.csv and ship.json (kdflow.analysis.ship).
from kdflow.workflow.cli import run_step
from kdflow.analysis.ship import ship

run_step(
    snakemake.log[0],
    lambda: ship(
        snakemake.input.exports,
        snakemake.input.latency,
        snakemake.input.headline,
        snakemake.output.ship,
        snakemake.output.verdict,
    ),
)
