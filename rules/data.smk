# Download -> verify -> convert -> split. Local rules: cheap, CPU only, and on a
# cluster the login node is the one that can reach the internet.


localrules:
    download,
    convert,
    split,


rule download:
    output:
        "results/data/cifar-10-python.tar.gz",
    params:
        url=config["data"]["url"],
        md5=config["data"]["md5"],
    log:
        "results/logs/download.log",
    conda:
        "../envs/kdflow.yaml"
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
    script:
        "../scripts/convert.py"


rule split:
    input:
        rules.convert.output,
    output:
        SPLIT,
    params:
        val_size=config["data"]["val_size"],
        seed=config["data"]["split_seed"],
    log:
        "results/logs/split.log",
    conda:
        "../envs/kdflow.yaml"
    script:
        "../scripts/split.py"
