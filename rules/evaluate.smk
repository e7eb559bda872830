# Test-set evaluation of every trained model; students are also compared with
# their teacher. Runs on the training device, hence gpu=1 as well.


rule evaluate:
    input:
        model="results/seed{seed}/{arm}/model.pt",
        dataset=DATASET,
        teacher=teacher_of,
    output:
        metrics="results/seed{seed}/{arm}/metrics.json",
        speed="results/seed{seed}/{arm}/speed.json",
    log:
        "results/logs/seed{seed}/{arm}/evaluate.log",
    benchmark:
        "results/benchmarks/seed{seed}/{arm}/evaluate.tsv"
    conda:
        "../envs/kdflow.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        device=config["device"],
        speed=config["speed"],
    script:
        "../scripts/evaluate.py"


if SHARED_TEACHER:

    # The shared teacher, evaluated once; the aggregate repeats its results
    # for every seed. An imported teacher has no seed.
    use rule evaluate as evaluate_teacher with:
        input:
            model=TEACHER,
            dataset=DATASET,
        output:
            metrics="results/teacher/metrics.json",
            speed="results/teacher/speed.json",
        log:
            "results/logs/teacher/evaluate.log",
        benchmark:
            "results/benchmarks/teacher/evaluate.tsv"
        params:
            device=config["device"],
            speed=config["speed"],
            arm="teacher",
            seed=None if IMPORTED else TEACHER_SEED,
