from kdflow.workflow.cli import run_step
from kdflow.data.datasets import fetch

run_step(
    snakemake.log[0],
    lambda: fetch(snakemake.params.dataset, snakemake.params.url, snakemake.params.md5,
                  snakemake.output[0]),
)
