"""Every rule's script: run the rule's step (lexalign/steps/training.py) with its inputs, outputs and params by name."""

import sys
from pathlib import Path

# Snakemake runs a copy of this file; scriptdir is where the original lies. A checkout (or a copy of one) runs
# its own lexalign, beside scripts/. An installed workflow (lexalign/_workflow/scripts) runs the package it sits
# in: found already, unless the rule runs in a conda env of its own, where the package's folder is appended
# last, so the env's own packages win.
_root = Path(snakemake.scriptdir).parent  # noqa: F821 - Snakemake defines `snakemake`
if (_root / "lexalign" / "__init__.py").is_file():
    sys.path.insert(0, str(_root))
else:
    try:
        import lexalign  # noqa: F401
    except ImportError:
        sys.path.append(str(_root.parent.parent))

from lexalign.pipeline.rules import run_rule  # noqa: E402

run_rule(snakemake)  # noqa: F821
