# LexAlign: download → finetune (SFT) → validate preferences → align → evaluate → report (→ publish).
# Run: snakemake --cores 1            (everything, on config/config.yaml: the demo)
#      snakemake --cores 1 results/aligned


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/scale.smk"
include: "rules/download.smk"
include: "rules/finetune.smk"
include: "rules/validate.smk"
include: "rules/reference.smk"
include: "rules/align.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/publish.smk"


rule all:
    input:
        f"{RESULTS}/aligned",
        run_evaluations(),
        run_benchmarks(),
        f"{RESULTS}/report.html",
        publish_targets(),
    default_target: True
