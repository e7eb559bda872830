# Deployment: each model exported to ONNX, checked against PyTorch, quantised
# to int8 and timed in ONNX Runtime (kdflow.deploy). CPU jobs after the
# model's training; only the export section is their params, so changing it
# reruns these jobs, the aggregate and the report, never training.


rule export:
    input:
        model="results/seed{seed}/{arm}/model.pt",
        dataset=DATASET,
        split=SPLIT,
    output:
        **export_outputs("seed{seed}/{arm}"),
    log:
        "results/logs/seed{seed}/{arm}/export.log",
    benchmark:
        "results/benchmarks/seed{seed}/{arm}/export.tsv"
    conda:
        "../envs/kdflow.yaml"
    threads: 2
    params:
        export=EXPORT,
        # Calibration images are drawn with the split's seed: the same for
        # every model, so int8 accuracies compare like with like.
        seed=config["data"]["split_seed"],
    script:
        "../scripts/export.py"


if SHARED_TEACHER:

    use rule export as export_teacher with:
        input:
            model=TEACHER,
            dataset=DATASET,
            split=SPLIT,
        output:
            **export_outputs("teacher"),
        log:
            "results/logs/teacher/export.log",
        benchmark:
            "results/benchmarks/teacher/export.tsv"
