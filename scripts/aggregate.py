# Per-model files of both stages -> tables; the chosen settings' confirmation
# models come under confirmed_* keys once the choice exists.
from kdflow.analysis.aggregate import MODEL_FILES, aggregate
from kdflow.workflow.cli import run_step

run_step(
    snakemake.log[0],
    lambda: aggregate(
        files={
            k: list(snakemake.input.get(k, [])) + list(snakemake.input.get(f"confirmed_{k}", []))
            for k in MODEL_FILES
        },
        out=dict(snakemake.output.items()),
        confirm_seeds=snakemake.params.confirm_seeds,
        choice=snakemake.input.choice or None,
        # A shared teacher's files (an imported one has no history or training
        # benchmark), or None.
        teacher={k: snakemake.input.get(f"teacher_{k}") or None for k in MODEL_FILES}
        if snakemake.input.get("teacher_metrics") else None,
    ),
)
