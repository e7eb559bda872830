from kdflow.cli import run_step
from kdflow.data import fetch_archive

run_step(
    snakemake.log[0],
    lambda: fetch_archive(snakemake.params.url, snakemake.params.md5, snakemake.output[0]),
)
