# Exports one model to ONNX (and int8), checked and timed (kdflow.deploy).
from kdflow.workflow.cli import run_step
from kdflow.deploy.job import export_model

settings = snakemake.params.export
run_step(
    snakemake.log[0],
    lambda: export_model(
        snakemake.input.model,
        snakemake.input.dataset,
        snakemake.input.split,
        snakemake.output.record.rsplit("/", 1)[0],
        calibration_images=settings["calibration_images"],
        seed=snakemake.params.seed,
        int8="int8" in settings["formats"],
        threads=snakemake.threads,
    ),
)
