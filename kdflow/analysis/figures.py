"""The report's figures by name: one list for the report and the workflow's outputs.

Apart from kdflow.analysis.report, whose plotting libraries take seconds to
import, because Snakemake reads this list each time it parses the workflow.
Each figure `name` is written to results/figures/<name>.png and has its
caption for `snakemake --report` in report/<name>.rst.
"""

FIGURES = ("accuracy", "paired", "curves", "agreement", "per_class", "confusion",
           "reliability", "efficiency", "study", "heatmap", "ship")

# Figures with nothing to show in some runs: a study figure and a heatmap of
# one setting per student (the headline says it all), a deployment figure
# without exports.
STUDY_FIGURES = ("study", "heatmap")
EXPORT_FIGURES = ("ship",)


def shown(settings_per_student: int, exported: bool) -> tuple[str, ...]:
    """The figures a run draws, in FIGURES order."""
    left_out = (STUDY_FIGURES if settings_per_student < 2 else ()) \
        + (EXPORT_FIGURES if not exported else ())
    return tuple(name for name in FIGURES if name not in left_out)
