# After the aggregate: the headline's models timed together, and what you
# would ship (kdflow.analysis.ship). Only with export on.
if EXPORT["enabled"]:

    localrules:
        ship,

    rule time_models:
        # The headline's models (teacher, plain and distilled student on
        # its seeds), timed round by round in one process. It comes after
        # the aggregate, so no job of this run is left to run beside it, and
        # it takes every core a local run has; under a cluster executor it
        # is one job (kdflow.deploy.timing).
        input:
            exports=rules.aggregate.output.exports,
            headline=rules.aggregate.output.headline,
        output:
            latency="results/summary/latency.csv",
            samples="results/summary/latency_samples.csv",
        log:
            "results/logs/time_models.log",
        benchmark:
            "results/benchmarks/time_models.tsv"
        conda:
            "../envs/kdflow.yaml"
        threads: workflow.cores
        params:
            export={k: EXPORT[k] for k in ("batch", "warmup", "runs", "rounds", "threads")},
        script:
            "../scripts/time_models.py"

    rule ship:
        # Which variant each student ships and whether distillation changed
        # that (kdflow.analysis.ship): seconds of pandas.
        input:
            exports=rules.aggregate.output.exports,
            headline=rules.aggregate.output.headline,
            latency=rules.time_models.output.latency,
        output:
            ship=report(
                "results/summary/ship.csv",
                caption="../report/ship_table.rst",
                category="Tables",
            ),
            verdict="results/summary/ship.json",
        log:
            "results/logs/ship.log",
        conda:
            "../envs/kdflow.yaml"
        script:
            "../scripts/ship.py"
