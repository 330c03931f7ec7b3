# Step 1: models and datasets from the demo, a local path or the Hub.

localrules: download_model, download_data


rule download_model:
    input:
        local_input("model"),
        code=package_modules("download", "hub/__init__", "hub/errors", "hub/fetch", "hub/manifest", "demo/model",
                             "demo/task", "config/stages"),
    output:
        directory(f"{RESULTS}/models/base"),
    params:
        source=source_params("model"),
        kind="model",
        seed=config["seed"],
    conda:
        "../envs/lexalign.yaml"
    log:
        f"{LOGS}/download_model.log",
    script:
        "../scripts/download.py"


rule download_data:
    input:
        lambda wc: local_input(wc.dataset),
        code=package_modules("download", "hub/__init__", "hub/errors", "hub/fetch", "hub/manifest", "demo/data",
                             "demo/task", "config/stages", "data/layout"),
    output:
        directory(f"{RESULTS}/data/raw/{{dataset}}"),
    params:
        source=lambda wc: source_params(wc.dataset),
        kind=lambda wc: wc.dataset,
        seed=config["seed"],
    wildcard_constraints:
        dataset="sft_data|preference_data",
    conda:
        "../envs/lexalign.yaml"
    log:
        f"{LOGS}/download_{{dataset}}.log",
    script:
        "../scripts/download.py"
