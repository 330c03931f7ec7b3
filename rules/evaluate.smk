# Step 5: did alignment work? Each run against its SFT reference, on the same held-out data. → lexalign.stages.evaluate


rule evaluate:
    input:
        aligned=f"{RESULTS}/aligned",
        reference=sft_model(),
        # Every run is scored on the same held-out pairs, so runs compare.
        data=f"{RESULTS}/data/preferences",
        ranked=ranking_data(),
        code=step_code("evaluate"),
    output:
        output=f"{RESULTS}/eval/aligned.json",
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
        "../scripts/step.py"


use rule evaluate as evaluate_run with:
    input:
        aligned=f"{RESULTS}/runs/{{run}}/model",
        reference=sft_model(),
        data=f"{RESULTS}/data/preferences",
        ranked=ranking_data(),
        code=step_code("evaluate_run"),
    output:
        output=f"{RESULTS}/runs/{{run}}/eval.json",
    params:
        evaluate=config["evaluate"],
        beta=lambda wc: run_alignment(wc.run)["beta"],
        seed=config["seed"],
    log:
        f"{LOGS}/evaluate/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{run}}.tsv"


# Every run of the sweep, evaluated (the report is built on top of these).
rule sweep:
    input:
        run_evaluations(),
