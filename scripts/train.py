# Trains one model of the study: a teacher, a plain student or a distilled
# student, as its plan record (the `arm` param, kdflow.study.planner.plan) says.
from kdflow.workflow.cli import run_step
from kdflow.train.job import train

run_step(
    snakemake.log[0],
    lambda: train(
        snakemake.params.arm,
        dataset=snakemake.input.dataset,
        split=snakemake.input.split,
        teacher=snakemake.input.get("teacher"),
        teacher_logits=snakemake.input.get("teacher_logits") or None,
        out_model=snakemake.output.model,
        out_history=snakemake.output.history,
        seed=snakemake.params.seed,
        init=snakemake.input.get("init") or None,
        init_record=snakemake.config["teacher"]["init"],
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
