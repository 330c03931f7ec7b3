"""The reference step: a Snakemake rule's script (`lexalign align` alone computes the reference online)."""

import sys
from pathlib import Path

# Importable from a checkout without installing (Snakemake runs a copy of this file).
_smk = globals().get("snakemake")
sys.path.insert(0, str(Path(_smk.scriptdir if _smk else Path(__file__).resolve().parent).parent))

from lexalign.workflow import main_script  # noqa: E402

main_script("reference", _smk)
