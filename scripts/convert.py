from kdflow.workflow.cli import run_step
from kdflow.data.datasets import convert

run_step(
    snakemake.log[0],
    lambda: convert(
        snakemake.input[0] if snakemake.input else snakemake.params.directory,
        snakemake.output[0],
        dataset=snakemake.params.dataset,
        md5=snakemake.params.md5,
        image_size=snakemake.params.image_size,
    ),
)
