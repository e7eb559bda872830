from kdflow.cli import run_step
from kdflow.data import convert_archive

run_step(
    snakemake.log[0],
    lambda: convert_archive(
        snakemake.input[0],
        snakemake.output[0],
        dataset=snakemake.params.dataset,
        md5=snakemake.params.md5,
    ),
)
