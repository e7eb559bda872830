from kdflow.workflow.cli import run_step
from kdflow.analysis.report import render_report

run_step(
    snakemake.log[0],
    lambda: render_report(
        tables=dict(snakemake.input.items()),
        out=snakemake.output.html,
        figures={k: v for k, v in snakemake.output.items() if k != "html"},
        title=snakemake.params.title,
        experiment=snakemake.params.experiment,
        published=snakemake.params.published,
    ),
)
