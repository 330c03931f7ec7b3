"""Running the Snakemake workflow in tests: a temporary copy of it, the snakemake command, its dry-run plan.

Shared by the pipeline, reference, SLURM and own-model tests (a helper module, not a test module).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from lexalign.pipeline.workflow_files import WORKFLOW_FILES, copy_workflow  # noqa: F401 - the tests' one import

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
# A Hub token planted in the environment of every pipeline run: it must never reach an output or a log.
PLANTED_TOKEN = "hf_PlantedTokenForLeakTests0123456789"


def snakemake(workdir: Path, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`snakemake *args` in `workdir`; `env`: more variables (a None value removes one)."""
    env = {**os.environ, "HF_TOKEN": PLANTED_TOKEN, **(env or {})}
    env = {key: value for key, value in env.items() if value is not None}
    return subprocess.run([SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)


def planned_jobs(output: str) -> dict[str, int]:
    """The `Job stats` table of a dry run: rule → count."""
    stats = output.split("Job stats:", 1)[1]
    jobs = {}
    for line in stats.splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match and match.group(1) != "total":
            jobs[match.group(1)] = int(match.group(2))
    return jobs


def edit_config(workdir: Path, section: str, key: str, value) -> None:
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
