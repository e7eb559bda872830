"""The report's figures by name: one list for the report and the workflow's outputs.

Apart from kdflow.analysis.report, whose plotting libraries take seconds to import,
because Snakemake reads this list each time it parses the workflow. Each
figure `name` is written to results/figures/<name>.png and has its caption
for `snakemake --report` in report/<name>.rst.
"""

FIGURES = ("accuracy", "paired", "curves", "agreement", "per_class", "confusion",
           "reliability", "efficiency", "study", "heatmap")
