# One training job per model and seed. Each declares gpu=1, so with
# `--resources gpu=1` one trains at a time while CPU rules run beside it.
# params carry exactly the config a job depends on, its plan record
# (kdflow.study.planner.plan): a student setting never reruns a teacher, and one
# distillation setting never reruns another.


if not IMPORTED:

    rule train_teacher:
        input:
            dataset=DATASET,
            split=SPLIT,
            # Fine-tuning: the weights training starts from (teacher.init).
            init=TEACHER_INIT or [],
        output:
            model=TEACHER,
            history=f"results/{TEACHER_AT}teacher/history.csv",
        log:
            f"results/logs/{TEACHER_AT}teacher/train.log",
        benchmark:
            f"results/benchmarks/{TEACHER_AT}teacher/train.tsv"
        conda:
            "../envs/kdflow.yaml"
        threads: 4
        resources:
            gpu=1,
        params:
            # The plan record (kdflow.study.planner): role, training section.
            arm=PLAN["teacher"].record(),
            seed=job_seed,
            device=config["device"],
            engine=config["engine"],
        script:
            "../scripts/train.py"


if IMPORTED:

    rule import_teacher:
        # A trained teacher from outside (teacher.checkpoint), checked against
        # this config's architecture and the dataset (kdflow.models.weights:
        # what could not be checked is listed in its source record),
        # measured on the validation split, and written as this run's teacher
        # checkpoint.
        input:
            source=TEACHER_SOURCE,
            dataset=DATASET,
            split=SPLIT,
        output:
            model=TEACHER,
        log:
            "results/logs/teacher/import.log",
        conda:
            "../envs/kdflow.yaml"
        threads: 4
        resources:
            gpu=1,
        params:
            # The plan record with the one training key an import uses, its
            # model: the rest (epochs, optimiser, ...) trains nothing here,
            # and as params would rerun the import and all after it.
            arm={
                **PLAN["teacher"].record(),
                "training": {"model": TEACHER_CFG["model"]},
            },
            # {url, md5}, its md5 in lower case (kdflow.workflow.config).
            source=TEACHER_CFG["checkpoint"],
            device=config["device"],
            engine=config["engine"],
        script:
            "../scripts/import_teacher.py"


rule teacher_logits:
    # The teacher (eval mode) gives the same logits for an image every epoch:
    # computed once per seed here and shared by every logit-based student
    # without augmentation (with augmentation the teacher runs online on the
    # student's views).
    input:
        teacher=TEACHER,
        dataset=DATASET,
        split=SPLIT,
    output:
        TEACHER_LOGITS,
    log:
        f"results/logs/{TEACHER_AT}teacher/logits.log",
    conda:
        "../envs/kdflow.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        device=config["device"],
        engine=config["engine"],
    script:
        "../scripts/teacher_logits.py"


rule train_student_baseline:
    input:
        dataset=DATASET,
        split=SPLIT,
        teacher=TEACHER,
        # student.init: the same file for the plain and the distilled students.
        init=student_init,
    output:
        model="results/seed{seed}/{student}/ce/model.pt",
        history="results/seed{seed}/{student}/ce/history.csv",
    log:
        "results/logs/seed{seed}/{student}/ce/train.log",
    benchmark:
        "results/benchmarks/seed{seed}/{student}/ce/train.tsv"
    conda:
        "../envs/kdflow.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        arm=arm_record,
        seed=job_seed,
        device=config["device"],
        engine=config["engine"],
    script:
        "../scripts/train.py"


rule train_student_kd:
    input:
        dataset=DATASET,
        split=SPLIT,
        teacher=TEACHER,
        teacher_logits=cached_teacher_logits,
        init=student_init,
    output:
        model="results/seed{seed}/{student}/{method}/{setting}/model.pt",
        history="results/seed{seed}/{student}/{method}/{setting}/history.csv",
    log:
        "results/logs/seed{seed}/{student}/{method}/{setting}/train.log",
    benchmark:
        "results/benchmarks/seed{seed}/{student}/{method}/{setting}/train.tsv"
    conda:
        "../envs/kdflow.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        # Role, training section, method and this setting's values only.
        arm=arm_record,
        seed=job_seed,
        device=config["device"],
        engine=config["engine"],
    script:
        "../scripts/train.py"
