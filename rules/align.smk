# Step 4: preference alignment of the SFT model.


rule align:
    input:
        model=f"{RESULTS}/models/sft",
        data=f"{RESULTS}/data/preferences",
        code=package_modules("stages", "train/job", "train/runtime", "train/callbacks", "train/align"),
    output:
        directory(f"{RESULTS}/aligned"),
    params:
        alignment=config["alignment"],
        device=config["device"],
        seed=training_seed(),
        trust_remote_code=config["model"]["trust_remote_code"],
        checkpoint_dir=f"{RESULTS}/checkpoints/aligned",
    conda:
        "../envs/lexalign.yaml"
    log:
        f"{LOGS}/align.log",
    benchmark:
        f"{RESULTS}/benchmarks/align.tsv"
    script:
        "../scripts/align.py"
