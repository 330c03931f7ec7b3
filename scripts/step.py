"""Every rule's script: run the rule's step (lexalign/stages.py) with its inputs, outputs and params by name."""

import sys
from pathlib import Path

# Importable from a checkout without installing (Snakemake runs a copy of this file).
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - Snakemake defines `snakemake`

from lexalign.workflow import run_rule  # noqa: E402

run_rule(snakemake)  # noqa: F821
