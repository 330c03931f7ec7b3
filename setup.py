"""Build hook: the wheel carries the workflow (Snakefile, rules, scripts, profiles, configs, envs, report) as
package data under lexalign/_workflow/, copied from the repository root at build time, so a `pip install`ed
LexAlign runs its pipeline with no checkout (`lexalign workflow-path`, `lexalign init`). The root layout stays
the one place these files are edited; the list of what is copied is WORKFLOW_FILES of
lexalign/pipeline/workflow_files.py."""

import ast
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _workflow_files() -> list[str]:
    """WORKFLOW_FILES of lexalign/pipeline/workflow_files.py, read without importing the package (no deps here)."""
    tree = ast.parse((HERE / "lexalign" / "pipeline" / "workflow_files.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WORKFLOW_FILES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("lexalign/pipeline/workflow_files.py defines no WORKFLOW_FILES")


class BuildWithWorkflow(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "lexalign" / "_workflow"
        shutil.rmtree(target, ignore_errors=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "config.yaml.*", ".snakemake")
        for name in _workflow_files():
            source = HERE / name
            if source.is_dir():
                shutil.copytree(source, target / name, ignore=ignore)
            elif source.is_file():
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
            else:
                raise RuntimeError(f"workflow file {name} is missing from the source tree")


setup(cmdclass={"build_py": BuildWithWorkflow})
