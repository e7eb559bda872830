# Download -> verify -> convert [-> subset] -> split. Local rules: cheap, CPU
# only, and on a cluster the login node is the one that can reach the internet.


localrules:
    convert,
    split,


if ARCHIVE:

    localrules:
        download,

    rule download:
        output:
            ARCHIVE,
        log:
            "results/logs/download.log",
        conda:
            "../envs/kdflow.yaml"
        params:
            dataset=DATA,
            url=config["data"]["url"],
            md5=config["data"]["md5"],
        script:
            "../scripts/download.py"


rule convert:
    input:
        ARCHIVE or [],
    output:
        CONVERTED,
    log:
        "results/logs/convert.log",
    conda:
        "../envs/kdflow.yaml"
    params:
        # How a folder's images are resized and cropped (kdflow.data.preprocessing):
        # a new preparation converts them again. Nothing for CIFAR, used as stored.
        **preprocessing_params(DATA, config["data"]["image_size"]),
        dataset=DATA,
        directory=SOURCE_DIR,
        # Re-checked before reading: the archive may have changed since download.
        md5=config["data"].get("md5"),
        image_size=config["data"]["image_size"],
        # A directory read in place is no input Snakemake can date: a digest
        # of its files' names, sizes and times reruns conversion on any edit.
        fingerprint=fingerprint(DATA, config["data"]["url"]),
    script:
        "../scripts/convert.py"


if DATASET != CONVERTED:

    localrules:
        subset,

    rule subset:
        input:
            CONVERTED,
        output:
            DATASET,
        log:
            "results/logs/subset.log",
        conda:
            "../envs/kdflow.yaml"
        params:
            train=SUBSET["train"],
            test=SUBSET["test"],
            seed=config["data"]["split_seed"],
        script:
            "../scripts/subset.py"


rule split:
    input:
        DATASET,
    output:
        SPLIT,
    log:
        "results/logs/split.log",
    conda:
        "../envs/kdflow.yaml"
    params:
        val_size=config["data"]["val_size"],
        seed=config["data"]["split_seed"],
    script:
        "../scripts/split.py"


# Weights from outside (teacher.checkpoint or teacher.init): fetched and
# md5-verified as a dataset's archive is; a new md5 fetches again, which
# reruns what uses the file (the import or the teacher's training) and,
# through the teacher, every student, but nothing upstream (md5s arrive in
# lower case, kdflow.workflow.config: one written in capitals is the same
# md5 and reruns nothing). Local rules, like the dataset's download.
if IMPORTED:

    localrules:
        fetch_teacher_checkpoint,

    rule fetch_teacher_checkpoint:
        output:
            TEACHER_SOURCE,
        log:
            "results/logs/teacher/fetch_checkpoint.log",
        conda:
            "../envs/kdflow.yaml"
        params:
            key="teacher.checkpoint",
            url=TEACHER_CFG["checkpoint"]["url"],
            md5=TEACHER_CFG["checkpoint"]["md5"],
        script:
            "../scripts/fetch_weights.py"


if TEACHER_INIT:

    localrules:
        fetch_teacher_init,


if TEACHER_INIT and not pretrained.is_torchvision(TEACHER_CFG["init"]):

    rule fetch_teacher_init:
        output:
            TEACHER_INIT,
        log:
            "results/logs/teacher/fetch_init.log",
        conda:
            "../envs/kdflow.yaml"
        params:
            key="teacher.init",
            url=TEACHER_CFG["init"]["url"],
            md5=TEACHER_CFG["init"]["md5"],
        script:
            "../scripts/fetch_weights.py"

elif TEACHER_INIT:

    # torchvision's weights by name (kdflow.models.pretrained): verified
    # with the SHA-256 prefix torchvision publishes, from teacher.init.url,
    # torch.hub's cache or torchvision's URL.
    rule fetch_teacher_init:
        output:
            TEACHER_INIT,
        log:
            "results/logs/teacher/fetch_init.log",
        conda:
            "../envs/kdflow.yaml"
        params:
            key="teacher.init",
            model=TEACHER_CFG["model"],
            spec=TEACHER_CFG["init"],
            weights=resolved_init("teacher", TEACHER_CFG["model"]),
        script:
            "../scripts/fetch_weights.py"


# student.init: one file per student architecture, as the teacher's.
if STUDENT_INIT:

    localrules:
        fetch_student_init,

    rule fetch_student_init:
        output:
            STUDENT_INIT,
        log:
            "results/logs/students/{student}/fetch_init.log",
        conda:
            "../envs/kdflow.yaml"
        params:
            key="student.init",
            # {url, md5}, or a torchvision name with what it resolves to
            # for this architecture.
            model=lambda w: w.student,
            spec=config["student"]["init"],
            weights=lambda w: (
                resolved_init("student", w.student)
                if pretrained.is_torchvision(config["student"]["init"])
                else None
            ),
        script:
            "../scripts/fetch_weights.py"
