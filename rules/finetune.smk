# Step 2: supervised fine-tuning of the base model. → lexalign.steps.training.prepare_sft, lexalign.steps.training.finetune


rule prepare_sft_data:
    input:
        raw=f"{RESULTS}/data/raw/sft_data",
        code=step_code("prepare_sft_data"),
    output:
        output=directory(f"{RESULTS}/data/sft"),
    params:
        data=config["sft_data"],
        seed=config["seed"],
    conda:
        conda_env()
    log:
        f"{LOGS}/prepare_sft_data.log",
    script:
        "../scripts/step.py"


rule finetune:
    input:
        model=f"{RESULTS}/models/base",
        data=f"{RESULTS}/data/sft",
        code=step_code("finetune"),
    output:
        output=directory(f"{RESULTS}/models/sft"),
    resources:
        **scale_resources("finetune"),
    params:
        finetune=config["finetune"],
        device=config["device"],
        seed=training_seed(),
        trust_remote_code=config["model"]["trust_remote_code"],
        allow_pickle=config["model"]["allow_pickle"],
        # Outside the output: Snakemake deletes a failed job's outputs, checkpoints must survive.
        checkpoint_dir=f"{RESULTS}/checkpoints/sft",
        tracking=tracking_params("sft"),
    conda:
        conda_env()
    log:
        f"{LOGS}/finetune.log",
    benchmark:
        f"{RESULTS}/benchmarks/finetune.tsv"
    script:
        "../scripts/step.py"
