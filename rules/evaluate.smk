# Step 5: did alignment work? Aligned model against its SFT reference.


rule evaluate:
    input:
        aligned=f"{RESULTS}/aligned",
        reference=f"{RESULTS}/models/sft",
        data=f"{RESULTS}/data/preferences",
        code=package_modules("stages", "evaluate", "demo/task"),
    output:
        f"{RESULTS}/eval/aligned.json",
    params:
        evaluate=config["evaluate"],
        beta=config["alignment"]["beta"],
        seed=config["seed"],
    conda:
        "../envs/lexalign.yaml"
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate.tsv"
    script:
        "../scripts/evaluate.py"
