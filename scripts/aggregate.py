from kdflow.aggregate import MODEL_FILES, aggregate
from kdflow.cli import run_step

run_step(
    snakemake.log[0],
    lambda: aggregate(
        files={k: list(snakemake.input[k]) for k in MODEL_FILES},
        out=dict(snakemake.output.items()),
    ),
)
