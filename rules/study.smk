# The selection stage of a two-stage study (config confirm_seeds): the
# distilled setting of each student with the best mean validation accuracy
# over the selection seeds. A checkpoint, since which models the confirmation
# seeds train depends on its result; it reads checkpoints (validation
# accuracy) only, never a test-set evaluation.


localrules:
    choose,


checkpoint choose:
    input:
        checkpoints=expand(
            "results/seed{seed}/{arm}/model.pt",
            seed=SEEDS,
            arm=[a.path for a in DISTILLED],
        ),
    output:
        choice=CHOICE,
    log:
        "results/logs/choose.log",
    conda:
        "../envs/kdflow.yaml"
    params:
        # (seed, arm, student, plan index) of each checkpoint, in the same
        # order; the plan index breaks ties (kdflow.study.planner.choose).
        runs=[
            {
                "seed": seed,
                "arm": a.path,
                "student": a.model,
                "order": ARMS.index(a.path),
            }
            for seed in SEEDS
            for a in DISTILLED
        ],
    script:
        "../scripts/choose.py"
