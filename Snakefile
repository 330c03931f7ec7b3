# LexAlign: download → finetune (SFT) → validate preferences → align → evaluate.
# Run: snakemake --cores 1            (everything, on config/config.yaml: the demo)
#      snakemake --cores 1 results/aligned


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/finetune.smk"
include: "rules/validate.smk"
include: "rules/align.smk"
include: "rules/evaluate.smk"


rule all:
    input:
        f"{RESULTS}/aligned",
        f"{RESULTS}/eval/aligned.json",
    default_target: True
