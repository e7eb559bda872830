# Deployment: each model exported to ONNX, checked against PyTorch and
# quantised to int8 (kdflow.deploy), one CPU job per model after its
# training; then the models the report compares timed together in one job
# that runs alone, and the choice of what to ship (kdflow.analysis.ship).
# Only the export keys a job uses are its params: the format and
# calibration settings rerun the exports, the timing settings only the
# timing job, the ship step and the report; nothing here reruns training.


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
        export={k: EXPORT[k] for k in ("formats", "calibration_images")},
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

