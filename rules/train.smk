# One training job per model and seed. Each declares gpu=1, so with
# `--resources gpu=1` one trains at a time while CPU rules run beside it.
# params carry exactly the config a job depends on: a student setting never
# reruns a teacher.


rule train_teacher:
    input:
        dataset=DATASET,
        split=SPLIT,
    output:
        model="results/seed{seed}/teacher/model.pt",
        history="results/seed{seed}/teacher/history.csv",
    log:
        "results/logs/seed{seed}/train_teacher.log",
    benchmark:
        "results/benchmarks/seed{seed}/train_teacher.tsv"
    conda:
        "../envs/kdflow.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        model_cfg=config["teacher"],
        device=config["device"],
        engine=config["engine"],
    script:
        "../scripts/train.py"


rule train_student_baseline:
    input:
        dataset=DATASET,
        split=SPLIT,
        teacher=rules.train_teacher.output.model,
    output:
        model="results/seed{seed}/student_baseline/model.pt",
        history="results/seed{seed}/student_baseline/history.csv",
    log:
        "results/logs/seed{seed}/train_student_baseline.log",
    benchmark:
        "results/benchmarks/seed{seed}/train_student_baseline.tsv"
    conda:
        "../envs/kdflow.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        model_cfg=config["student"],
        device=config["device"],
        engine=config["engine"],
    script:
        "../scripts/train.py"


rule train_student_kd:
    input:
        dataset=DATASET,
        split=SPLIT,
        teacher=rules.train_teacher.output.model,
    output:
        model="results/seed{seed}/student_kd/model.pt",
        history="results/seed{seed}/student_kd/history.csv",
    log:
        "results/logs/seed{seed}/train_student_kd.log",
    benchmark:
        "results/benchmarks/seed{seed}/train_student_kd.tsv"
    conda:
        "../envs/kdflow.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        model_cfg=config["student"],
        kd=config["kd"],
        device=config["device"],
        engine=config["engine"],
    script:
        "../scripts/train.py"
