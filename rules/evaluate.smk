# Step 5: did alignment work? Each run against its SFT reference, on the same held-out data. → lexalign.steps.training.evaluate
# scale.evaluate (every run's evaluation: evaluate_run inherits the resources): several processes each score a
# share of the batches; the main process writes the same json (lexalign.core.shares).


rule evaluate:
    input:
        # A reward function's file, IFEval's prompts (not arguments: the step reads the config's paths) -
        # editing one re-evaluates.
        judge_files(config["evaluate"]["judge"]),
        aligned=f"{RESULTS}/aligned",
        reference=sft_model(),
        # Every run is scored on the same held-out pairs, so runs compare.
        data=f"{RESULTS}/data/preferences",
        ranked=ranking_data(),
        reward_model=reward_model_input(),
        code=step_code("evaluate"),
    output:
        output=f"{RESULTS}/eval/aligned.json",
    resources:
        **scale_resources("evaluate"),
    params:
        # The evaluate section but lm_eval (its own rules): changing the benchmarks reruns only those.
        evaluate=evaluate_params(),
        beta=config["alignment"]["beta"],
        seed=config["seed"],
        device=config["device"],
    conda:
        conda_env()
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate.tsv"
    script:
        "../scripts/step.py"


use rule evaluate as evaluate_run with:
    input:
        judge_files(config["evaluate"]["judge"]),
        aligned=f"{RESULTS}/runs/{{run}}/model",
        reference=sft_model(),
        data=f"{RESULTS}/data/preferences",
        ranked=ranking_data(),
        reward_model=reward_model_input(),
        code=step_code("evaluate_run"),
    output:
        output=f"{RESULTS}/runs/{{run}}/eval.json",
    params:
        evaluate=evaluate_params(),
        beta=lambda wc: run_alignment(wc.run)["beta"],
        seed=config["seed"],
        device=config["device"],
    log:
        f"{LOGS}/evaluate/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{run}}.tsv"


# The judge's reward model (evaluate.judge: reward_model), fetched like the model: a local folder is
# hard-linked, a Hub repo downloaded (the only online step besides the downloads). → lexalign.steps.training.download
localrules: download_reward_model


rule download_reward_model:
    input:
        reward_model_local_input(),
        code=step_code("download_reward_model"),
    output:
        output=directory(f"{RESULTS}/models/reward"),
    params:
        source=reward_model_source(),
        kind="model",
        seed=config["seed"],
    conda:
        conda_env()
    log:
        f"{LOGS}/download_reward_model.log",
    script:
        "../scripts/step.py"


# Benchmarks (evaluate.lm_eval): EleutherAI's lm-evaluation-harness on the SFT model once, then on each
# aligned model, whose result pairs both. Rules of their own: changing evaluate.lm_eval reruns only these
# (and the report). In the DAG only when evaluate.lm_eval.tasks lists tasks. → lexalign.steps.training.lm_eval
rule lm_eval_sft:
    input:
        lm_eval_task_files(),
        model=sft_model(),
        code=step_code("lm_eval_sft"),
    output:
        output=f"{RESULTS}/eval/sft.lm_eval.json",
    params:
        lm_eval=config["evaluate"]["lm_eval"],
        device=config["device"],
        seed=config["seed"],
    conda:
        conda_env()
    log:
        f"{LOGS}/lm_eval/sft.log",
    benchmark:
        f"{RESULTS}/benchmarks/lm_eval/sft.tsv"
    script:
        "../scripts/step.py"


use rule lm_eval_sft as lm_eval with:
    input:
        lm_eval_task_files(),
        model=f"{RESULTS}/aligned",
        sft=f"{RESULTS}/eval/sft.lm_eval.json",
        code=step_code("lm_eval"),
    output:
        output=f"{RESULTS}/eval/aligned.lm_eval.json",
    log:
        f"{LOGS}/lm_eval/aligned.log",
    benchmark:
        f"{RESULTS}/benchmarks/lm_eval/aligned.tsv"


use rule lm_eval_sft as lm_eval_run with:
    input:
        lm_eval_task_files(),
        model=f"{RESULTS}/runs/{{run}}/model",
        sft=f"{RESULTS}/eval/sft.lm_eval.json",
        code=step_code("lm_eval_run"),
    output:
        output=f"{RESULTS}/runs/{{run}}/lm_eval.json",
    log:
        f"{LOGS}/lm_eval/runs/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/lm_eval/runs/{{run}}.tsv"


# Every run of the sweep, evaluated (the report is built on top of these).
rule sweep:
    input:
        run_evaluations(),
        run_benchmarks(),
