# LexAlign: download → finetune (SFT) → validate preferences → align → evaluate → report.
# Run: snakemake --cores 1            (everything, on config/config.yaml: the demo)
#      snakemake --cores 1 results/aligned


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/finetune.smk"
include: "rules/validate.smk"
include: "rules/reference.smk"
include: "rules/align.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    input:
        f"{RESULTS}/aligned",
        run_evaluations(),
        run_benchmarks(),
        f"{RESULTS}/report.html",
    default_target: True
