# All metrics -> tidy tables (pandas) -> figures (seaborn) -> one HTML file.
# Local rules: seconds of CPU work, not worth a cluster job.

# The report rule has one output per figure of kdflow.analysis.figures.FIGURES, named
# as the figure (results/figures/<name>.png, caption report/<name>.rst).
from kdflow.analysis.figures import shown as shown_figures

# The figures this run has something to show in (kdflow.analysis.figures).
SHOWN_FIGURES = shown_figures(len(planner.settings(config)), config["export"]["enabled"])


localrules:
    aggregate,
    report,


rule aggregate:
    input:
        **{key: per_model(pattern) for key, pattern in MODEL_PATTERNS.items()},
        **{
            f"confirmed_{key}": confirmed_models(pattern)
            for key, pattern in MODEL_PATTERNS.items()
        },
        **{f"teacher_{key}": path for key, path in SHARED_TEACHER_FILES.items()},
        choice=CHOICE if CONFIRM_SEEDS else [],
        # A shared teacher's files, once (rules/common.smk).
    output:
        metrics="results/summary/metrics.csv",
        history="results/summary/history.csv",
        per_class="results/summary/per_class.csv",
        confusion="results/summary/confusion.csv",
        calibration="results/summary/calibration.csv",
        jobs="results/summary/jobs.csv",
        provenance="results/summary/provenance.csv",
        arms=report(
            "results/summary/arms.csv", caption="../report/arms.rst", category="Tables"
        ),
        gain=report(
            "results/summary/kd_gain.csv",
            caption="../report/kd_gain.rst",
            category="Tables",
        ),
        study=report(
            "results/summary/study.csv",
            caption="../report/study_table.rst",
            category="Tables",
        ),
        exports="results/summary/exports.csv",
        headline="results/summary/headline.json",
    log:
        "results/logs/aggregate.log",
    conda:
        "../envs/kdflow.yaml"
    params:
        confirm_seeds=CONFIRM_SEEDS,
    script:
        "../scripts/aggregate.py"


rule report:
    input:
        **rules.aggregate.output,
        # What you would ship and the timings it rests on (rules/export.smk).
        **(
            {
                "ship": "results/summary/ship.csv",
                "ship_verdict": "results/summary/ship.json",
                "latency": "results/summary/latency.csv",
            }
            if EXPORT["enabled"]
            else {}
        ),
    output:
        **{name: figure(name) for name in SHOWN_FIGURES},
        html=report(
            "results/report.html", caption="../report/html.rst", category="Report"
        ),
    log:
        "results/logs/report.log",
    conda:
        "../envs/kdflow.yaml"
    params:
        title=config["report"]["title"],
        # The published accuracies a preset reproduces, shown beside the measured.
        published=config["report"]["published"],
        # Shown in the report; every one of these also reruns the jobs it
        # affects, so the report is rebuilt with them anyway.
        experiment={
            **{
                k: config[k]
                for k in (
                    "data",
                    "seeds",
                    "confirm_seeds",
                    "device",
                    "engine",
                    "teacher",
                    "student",
                    "kd",
                )
            },
            # An imported teacher uses none of the training keys: editing
            # them changes nothing the report could show.
            **(
                {
                    "teacher": {
                        k: TEACHER_CFG[k] for k in ("model", "checkpoint", "shared")
                    }
                }
                if IMPORTED
                else {}
            ),
        },
    script:
        "../scripts/report.py"
