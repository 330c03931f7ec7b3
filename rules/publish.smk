# Step 7: publish a run's model to the Hugging Face Hub, as one commit with its model card. → lexalign.steps.training.publish
# Part of the pipeline only when publish.repo_id is set (rule all asks for it then); the token comes from
# `hf auth login` or HF_TOKEN, never from the config.

localrules: publish


rule publish:
    input:
        model=published("model"),
        # The card carries the evaluation: publishing waits for it.
        evaluation=published("eval"),
        code=step_code("publish"),
    output:
        output=f"{RESULTS}/published.json",
    params:
        publish=config["publish"],
    conda:
        conda_env()
    log:
        f"{LOGS}/publish.log",
    script:
        "../scripts/step.py"
