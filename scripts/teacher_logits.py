from kdflow.workflow.cli import run_step
from kdflow.train.job import save_teacher_logits

run_step(
    snakemake.log[0],
    lambda: save_teacher_logits(
        snakemake.input.teacher,
        snakemake.input.dataset,
        snakemake.input.split,
        snakemake.output[0],
        device=snakemake.params.device,
        engine=snakemake.params.engine,
        threads=snakemake.threads,
        # Where the images are held changes no result: read here, not
        # passed as params, so it reruns nothing.
        placement=snakemake.config["placement"],
    ),
    # A GPU slot before CUDA starts (kdflow.core.gpu); the config's gpu section is
    # read here, not passed as params, so it never reruns a job.
    device=snakemake.params.device,
    gpu_config=snakemake.config["gpu"],
)
