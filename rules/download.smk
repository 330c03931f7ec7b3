# Step 1: models and datasets from the demo, a local path or the Hub. → lexalign.steps.training.download

localrules: download_model, download_data


rule download_model:
    input:
        local_input("model"),
        code=step_code("download_model"),
    output:
        output=directory(f"{RESULTS}/models/base"),
    params:
        source=source_params("model"),
        kind="model",
        seed=config["seed"],
    conda:
        conda_env()
    log:
        f"{LOGS}/download_model.log",
    script:
        "../scripts/step.py"


rule download_data:
    input:
        lambda wc: local_input(wc.dataset),
        code=step_code("download_data"),
    output:
        output=directory(f"{RESULTS}/data/raw/{{dataset}}"),
    params:
        source=lambda wc: source_params(wc.dataset),
        kind=lambda wc: wc.dataset,
        seed=config["seed"],
    wildcard_constraints:
        dataset="sft_data|preference_data",
    conda:
        conda_env()
    log:
        f"{LOGS}/download_{{dataset}}.log",
    script:
        "../scripts/step.py"
