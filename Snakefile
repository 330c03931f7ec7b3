# LexAlign: download → finetune (SFT) → validate preferences → align → evaluate → report (→ publish).
# Run: snakemake --cores 1            (everything, on config/config.yaml: the demo)
#      snakemake --cores 1 results/aligned
# The workflow is workflow/Snakefile (the catalog's layout); this file uses it as a project made by
# `lexalign init` uses the installed copy, so the checkout, a catalog deployment and a project run the same
# rules the same way.


configfile: "config/config.yaml"


module lexalign:
    snakefile:
        "workflow/Snakefile"
    config:
        config


use rule * from lexalign
