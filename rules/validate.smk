# Step 3: validate the preference data (the gate before alignment).


rule validate_preferences:
    input:
        raw=f"{RESULTS}/data/raw/preference_data",
        # The base model's tokenizer measures lengths; finetune does not change it.
        tokenizer=f"{RESULTS}/models/base",
        code=package_modules("stages", "data/load", "data/preference", "data/common"),
    output:
        directory(f"{RESULTS}/data/preferences"),
    params:
        dataset=config["preference_data"],
        seed=config["seed"],
        trust_remote_code=config["model"]["trust_remote_code"],
    conda:
        "../envs/lexalign.yaml"
    log:
        f"{LOGS}/validate_preferences.log",
    script:
        "../scripts/validate.py"
