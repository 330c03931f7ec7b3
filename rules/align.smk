# Step 4: preference alignment of the SFT model; the primary run and the sweep runs. → lexalign.steps.training.align


rule align:
    input:
        model=sft_model(),
        data=preference_data(config["alignment"]),
        # The reference log-probs, computed once (rules/reference.smk).
        reference=reference_file(config["alignment"]),
        code=step_code("align"),
    output:
        output=directory(f"{RESULTS}/aligned"),
    resources:
        **scale_resources("align"),
    params:
        alignment=config["alignment"],
        device=config["device"],
        seed=training_seed(),
        trust_remote_code=config["model"]["trust_remote_code"],
        # Outside the output: Snakemake deletes a failed job's outputs, checkpoints must survive.
        checkpoint_dir=f"{RESULTS}/checkpoints/aligned",
        tracking=tracking_params("aligned"),
    conda:
        conda_env()
    log:
        f"{LOGS}/align.log",
    benchmark:
        f"{RESULTS}/benchmarks/align.tsv"
    script:
        "../scripts/step.py"


# A sweep run: the same step with the run's alignment config. Runs share the
# download, the SFT model and the validated data.
use rule align as align_run with:
    input:
        model=sft_model(),
        data=lambda wc: preference_data(run_alignment(wc.run)),
        reference=lambda wc: reference_file(run_alignment(wc.run)),
        code=step_code("align_run"),
    output:
        output=directory(f"{RESULTS}/runs/{{run}}/model"),
    params:
        alignment=lambda wc: run_alignment(wc.run),
        device=config["device"],
        seed=training_seed(),
        trust_remote_code=config["model"]["trust_remote_code"],
        checkpoint_dir=lambda wc: f"{RESULTS}/checkpoints/runs/{wc.run}",
        tracking=lambda wc: tracking_params(wc.run),
    log:
        f"{LOGS}/align/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/align/{{run}}.tsv"
