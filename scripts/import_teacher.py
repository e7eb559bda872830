# Imports a trained teacher (teacher.checkpoint) as this run's teacher checkpoint.
from kdflow.workflow.cli import run_step
from kdflow.train.teacher import import_teacher

run_step(
    snakemake.log[0],
    lambda: import_teacher(
        snakemake.params.arm,
        source=snakemake.input.source,
        source_record=dict(snakemake.params.source),
        dataset=snakemake.input.dataset,
        split=snakemake.input.split,
        out_model=snakemake.output.model,
        device=snakemake.params.device,
        engine=snakemake.params.engine,
        threads=snakemake.threads,
        # Where the images are held changes no result: read here, not
        # passed as params, so it reruns nothing.
        placement=snakemake.config["placement"],
    ),
    device=snakemake.params.device,
    gpu_config=snakemake.config["gpu"],
)
