"""Where LexAlign's workflow files are, and copies of them: the one list of what a workflow is.

A wheel carries the workflow as package data (lexalign/_workflow/, copied from
the repository root by setup.py, which reads WORKFLOW_FILES here); a checkout
runs the root's files. Either way `workflow_root()` finds them. The tests and
benchmarks run the pipeline in copies of a checkout (`copy_workflow`), never in
its results/.

Standard library and lexalign.core.errors only: a project's Snakefile imports this
module when Snakemake parses it.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from lexalign.core.errors import LexAlignError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
BUNDLED = PACKAGE_DIR / "_workflow"
"""The workflow inside an installed wheel."""
WORKFLOW_FILES = ("Snakefile", "workflow", "rules", "scripts", "config", "profiles", "envs", "report",
                  ".snakemake-workflow-catalog.yml")
"""What of the repository root the wheel carries (setup.py copies these, and reads this tuple)."""
EXAMPLES_DIR = "config/examples"
"""Example pipeline configs for `lexalign init --example NAME` (the demo is config/config.yaml itself)."""
DEFAULT_EXAMPLE = "demo"
REPO = PACKAGE_DIR.parent
"""A checkout's root (when this package is one's)."""


def workflow_root() -> Path:
    """The folder of the workflow this `lexalign` runs: the wheel's bundled copy, or the checkout's root."""
    if (BUNDLED / "Snakefile").is_file():
        return BUNDLED
    checkout = PACKAGE_DIR.parent
    if (checkout / "Snakefile").is_file() and (checkout / "rules").is_dir():
        return checkout
    raise LexAlignError("LexAlign's workflow is not installed beside the package",
                        f"Looked in {BUNDLED} and {checkout}",
                        hint="Reinstall LexAlign from its wheel (pip install lexalign-*.whl), or run from a checkout")


def snakefile() -> Path:
    """The workflow's Snakefile (workflow/Snakefile: what the checkout's root Snakefile and a project's
    `module lexalign:` use)."""
    return workflow_root() / "workflow" / "Snakefile"


def examples() -> dict[str, Path]:
    """Every example config `init` can start from, by name."""
    root = workflow_root()
    found = {DEFAULT_EXAMPLE: root / "config" / "config.yaml"}
    found.update((path.stem, path) for path in sorted((root / EXAMPLES_DIR).glob("*.yaml")))
    return found


def code_path(path: str | Path) -> str:
    """A source file as a rule input: relative to the working directory when it lies inside it (a checkout, or
    a copy of it, that moves is not 'changed input'), else absolute (the installed package's modules)."""
    return _code_path(str(path), os.getcwd())


@functools.cache  # a plan asks for each module once per rule that can run it: ~900 times, ~80 files
def _code_path(path: str, cwd: str) -> str:
    resolved, here = Path(path).resolve(), Path(cwd).resolve()
    return os.path.relpath(resolved, here) if resolved.is_relative_to(here) else str(resolved)


def copy_workflow(dest: Path, repo: Path = REPO) -> Path:
    """Copy a checkout's workflow (WORKFLOW_FILES) and its lexalign package into `dest` (created), without
    bytecode caches; return `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (*WORKFLOW_FILES, "lexalign"):
        src = repo / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "_workflow"))
        elif src.is_file():
            shutil.copy2(src, dest / name)
    return dest
