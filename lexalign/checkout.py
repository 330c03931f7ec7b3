"""A copy of this checkout's workflow (Snakefile, rules, package, configs) into a fresh folder.

The tests and the benchmarks run the pipeline in such copies, never in this
checkout's results/; one list of what a workflow is, for both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOW_FILES = ["Snakefile", "rules", "scripts", "config", "profiles", "envs", "report", "lexalign"]
"""What a workflow copy holds: everything Snakemake reads to plan and run the pipeline."""


def copy_workflow(dest: Path, repo: Path = REPO) -> Path:
    """Copy the workflow of `repo` into `dest` (created), without bytecode caches; return `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = repo / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest
