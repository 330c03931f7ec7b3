# Step 3: validate the preference data (the gate before alignment). → lexalign.steps.training.validate


rule validate_preferences:
    input:
        raw=f"{RESULTS}/data/raw/preference_data",
        # The base model's tokenizer measures lengths; finetune does not change it.
        tokenizer=f"{RESULTS}/models/base",
        code=step_code("validate_preferences"),
    output:
        output=directory(f"{RESULTS}/data/preferences"),
    params:
        dataset=config["preference_data"],
        seed=config["seed"],
        trust_remote_code=config["model"]["trust_remote_code"],
        # Whether a method that needs pairs reads these data (unpaired rows then stop here). KTO's weights are
        # no param here: the align step reports the rows' balance under them, so changing one reruns align alone.
        pairs_only=pairs_only(f"{RESULTS}/data/preferences"),
    conda:
        conda_env()
    log:
        f"{LOGS}/validate_preferences.log",
    script:
        "../scripts/step.py"


# GDPO with K > 2: the same data as ranked groups of K responses per prompt.
use rule validate_preferences as validate_groups with:
    output:
        output=directory(f"{RESULTS}/data/preferences-k{{k}}"),
    params:
        dataset=lambda wc: {**config["preference_data"], "group_size": int(wc.k)},
        seed=config["seed"],
        trust_remote_code=config["model"]["trust_remote_code"],
    wildcard_constraints:
        k=r"\d+",
    log:
        f"{LOGS}/validate_groups_k{{k}}.log",
