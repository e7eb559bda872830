from kdflow.workflow.cli import run_step
from kdflow.analysis.evaluate import evaluate

run_step(
    snakemake.log[0],
    lambda: evaluate(
        snakemake.input.model,
        snakemake.input.dataset,
        snakemake.output.metrics,
        out_speed=snakemake.output.speed,
        speed_settings=snakemake.params.speed,
        # A shared teacher's job has no wildcards: its params say.
        arm=snakemake.params.get("arm") or snakemake.wildcards.arm,
        seed=(snakemake.params.seed if "seed" in snakemake.params.keys()
              else int(snakemake.wildcards.seed)),
        teacher=snakemake.input.get("teacher") or None,
        device=snakemake.params.device,
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
