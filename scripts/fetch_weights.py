# Fetches a teacher's weights (teacher.checkpoint or teacher.init), md5-verified.
from kdflow.workflow.cli import run_step
from kdflow.data.fetch import fetch_archive

run_step(
    snakemake.log[0],
    lambda: fetch_archive(
        snakemake.params.url, snakemake.params.md5, snakemake.output[0],
        key=snakemake.params.key,
    ),
)
