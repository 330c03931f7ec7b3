# Step 3b: the reference (SFT) model's log-probabilities of every validated response, computed once.
# → lexalign.steps.training.reference
# Align reads them: no reference pass in any epoch, no second model for full fine-tuning. The file is
# keyed by the data, the layout (DPO pairs or GDPO's K), max_length and 4-bit loading, so a change of
# beta or loss_type, or a sweep run on the same SFT model, reuses it.
# scale.reference: several processes (and nodes) each score a share of the batches; the main process writes
# the same file (lexalign.core.shares).


rule reference:
    input:
        model=sft_model(),
        data=f"{RESULTS}/data/{{dataset}}",
        code=step_code("reference"),
    output:
        output=f"{RESULTS}/reference/{{dataset}}/{{setting}}.parquet",
    resources:
        **scale_resources("reference"),
    params:
        setting=lambda wc: parse_setting(wc.setting),
        device=config["device"],
        trust_remote_code=config["model"]["trust_remote_code"],
        # Tokens cached by content (tokenizer + texts): a new SFT model on the same data reuses them.
        cache_dir=f"{RESULTS}/cache/tokens",
    wildcard_constraints:
        dataset=r"preferences(-k\d+)?",
        setting=SETTING_PATTERN,
    conda:
        conda_env()
    log:
        f"{LOGS}/reference/{{dataset}}/{{setting}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/reference/{{dataset}}/{{setting}}.tsv"
    script:
        "../scripts/step.py"
