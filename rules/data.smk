# Download -> verify -> convert -> split. Local rules: cheap, CPU only, and on a
# cluster the login node is the one that can reach the internet.


localrules:
    download,
    convert,
    split,


rule download:
    output:
        ARCHIVE,
    log:
        "results/logs/download.log",
    conda:
        "../envs/kdflow.yaml"
    params:
        url=config["data"]["url"],
        md5=config["data"]["md5"],
    script:
        "../scripts/download.py"


rule convert:
    input:
        rules.download.output,
    output:
        DATASET,
    log:
        "results/logs/convert.log",
    conda:
        "../envs/kdflow.yaml"
    params:
        dataset=DATA,
        # Re-checked before reading: the archive may have changed since download.
        md5=config["data"]["md5"],
    script:
        "../scripts/convert.py"


rule split:
    input:
        rules.convert.output,
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
