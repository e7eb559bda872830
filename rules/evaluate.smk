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
