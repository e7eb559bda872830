from kdflow.workflow.cli import run_step
from kdflow.data.datasets import check_sizes, convert

source = snakemake.input[0] if snakemake.input else snakemake.params.directory


def step():
    # Before any image is decoded; the later steps' sizes come from the
    # config, not params: they are no input of conversion, so changing them
    # reruns none.
    check_sizes(source, snakemake.params.dataset, snakemake.config["data"],
                md5=snakemake.params.md5)
    return convert(
        source,
        snakemake.output[0],
        dataset=snakemake.params.dataset,
        md5=snakemake.params.md5,
        image_size=snakemake.params.image_size,
    )


run_step(snakemake.log[0], step)
