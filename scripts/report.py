"""The report step (Snakemake only): results/report.html comparing every run."""

import sys
from pathlib import Path

# Importable from a checkout without installing (Snakemake runs a copy of this file).
_smk = globals().get("snakemake")
sys.path.insert(0, str(Path(_smk.scriptdir if _smk else Path(__file__).resolve().parent).parent))

from lexalign.workflow import main_script  # noqa: E402

main_script("report", _smk)
