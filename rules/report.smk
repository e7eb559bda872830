# All metrics -> tidy tables (pandas) -> figures (seaborn) -> one HTML file.


rule aggregate:
    input:
        metrics=expand("results/seed{seed}/{arm}/metrics.json", seed=SEEDS, arm=ARMS),
        histories=expand("results/seed{seed}/{arm}/history.csv", seed=SEEDS, arm=ARMS),
        checkpoints=expand("results/seed{seed}/{arm}/model.pt", seed=SEEDS, arm=ARMS),
        benchmarks=expand(
            "results/benchmarks/seed{seed}/train_{arm}.tsv", seed=SEEDS, arm=ARMS
        ),
    output:
        metrics="results/summary/metrics.csv",
        history="results/summary/history.csv",
        arms="results/summary/arms.csv",
        gain="results/summary/kd_gain.csv",
        headline="results/summary/headline.json",
        provenance="results/summary/provenance.csv",
    log:
        "results/logs/aggregate.log",
    conda:
        "../envs/kdflow.yaml"
    script:
        "../scripts/aggregate.py"


rule report:
    input:
        **rules.aggregate.output,
    output:
        html="results/report.html",
    log:
        "results/logs/report.log",
    conda:
        "../envs/kdflow.yaml"
    params:
        title=config["report"]["title"],
        # Shown in the report; every one of these also reruns the jobs it
        # affects, so the report is rebuilt with them anyway.
        experiment={
            k: config[k]
            for k in (
                "data",
                "seeds",
                "device",
                "engine",
                "teacher",
                "student",
                "kd",
            )
        },
    script:
        "../scripts/report.py"
