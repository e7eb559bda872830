# Trains one model of the study: a teacher, a plain student or a distilled
# student, as its plan record (the `arm` param, kdflow.study.planner.plan) says.
from kdflow.workflow.cli import run_step
from kdflow.models.pretrained import init_source
from kdflow.train.job import train


def job():
    init = snakemake.input.get("init") or None
    # The init's source (teacher.init or student.init; a torchvision name
    # resolved for this model) comes from the plan record the job already
    # depends on: params of its own would rerun every job that has none.
    source, described = init_source(snakemake.params.arm["training"]) if init else (None, None)
    train(
        snakemake.params.arm,
        dataset=snakemake.input.dataset,
        split=snakemake.input.split,
        teacher=snakemake.input.get("teacher"),
        teacher_logits=snakemake.input.get("teacher_logits") or None,
        out_model=snakemake.output.model,
        out_history=snakemake.output.history,
        seed=snakemake.params.seed,
        init=init,
        init_record=source,
        init_described=described,
        device=snakemake.params.device,
        engine=snakemake.params.engine,
        threads=snakemake.threads,
        # Where the images are held changes no result: read here, not
        # passed as params, so it reruns nothing.
        placement=snakemake.config["placement"],
    )


run_step(
    snakemake.log[0],
    job,
    # A GPU slot before CUDA starts (kdflow.core.gpu); the config's gpu section is
    # read here, not passed as params, so it never reruns a job.
    device=snakemake.params.device,
    gpu_config=snakemake.config["gpu"],
)
