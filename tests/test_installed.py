"""LexAlign as a user gets it: the built wheel installed in a fresh venv outside the checkout, a project made
by `lexalign init`, the demo run to its report; then reinstalling and upgrading the package reruns exactly the
steps whose code changed.

One wheel build, one venv, one pipeline run for the whole module (the expensive part: ~2 minutes of pip).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from workflow import planned_jobs

pytestmark = pytest.mark.slow

# On a machine without an NVIDIA GPU, torch's CPU build (as the Makefile installs it): an unpinned torch pulls
# the multi-GB CUDA build.
TORCH = "torch" if shutil.which("nvidia-smi") else "torch==2.13.0"


def _run(cmd: list, cwd: Path | None = None, timeout: int = 900, env: dict | None = None):
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=env)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _copy_source(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked, and untracked but not ignored): what a release builds."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def _build_wheel(source: Path, out: Path) -> Path:
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, source])
    (wheel,) = out.glob("lexalign-*.whl")
    return wheel


class User:
    """A user's machine: a venv of their own with the wheel installed, and a project folder."""

    def __init__(self, root: Path):
        self.root = root
        self.venv = root / "venv"
        self.project = root / "my-align"
        self.bin = self.venv / "bin"
        # Nothing of the checkout or of the test's venv: a plain shell with the user's venv first on PATH.
        self.env = {key: value for key, value in os.environ.items()
                    if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        self.env["PATH"] = f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env["HF_HUB_OFFLINE"] = "1"

    def run(self, *cmd, cwd: Path | None = None, timeout: int = 900):
        return _run(cmd, cwd=cwd or self.project, timeout=timeout, env=self.env)

    def pip(self, *args):
        return self.run(self.bin / "python", "-m", "pip", "install", "-q", *args, cwd=self.root, timeout=1200)

    def plan(self) -> subprocess.CompletedProcess:
        return self.run(self.bin / "snakemake", "-n")


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    source = _copy_source(root / "source")
    wheel = _build_wheel(source, root / "wheel-1")
    person = User(root)
    _run([sys.executable, "-m", "venv", person.venv])
    person.pip(TORCH)
    # The wheel and its dependencies, as `pip install "lexalign[eval]"` resolves them (the demo's lm-eval task
    # needs the eval extra).
    person.pip(f"lexalign[eval] @ {wheel.as_uri()}")
    person.run(person.bin / "lexalign", "init", person.project, "--example", "demo", cwd=root)
    person.first_run = person.run(person.bin / "snakemake", "--cores", "2", timeout=1500)
    person.source, person.wheel = source, wheel
    return person


def test_the_installed_package_is_the_wheel_not_the_checkout(user):
    where = user.run(user.bin / "python", "-c", "import lexalign, sys; print(lexalign.__file__)").stdout.strip()
    assert Path(where).is_relative_to(user.venv) and not Path(where).is_relative_to(REPO)
    snakefile = Path(user.run(user.bin / "lexalign", "workflow-path").stdout.strip())
    assert snakefile.is_relative_to(user.venv / "lib") and snakefile.is_file()
    for part in ("rules/common.smk", "scripts/step.py", "profiles/slurm/config.yaml", "envs/lexalign-cpu.yaml",
                 "config/accelerate/fsdp.yaml", "config/examples/instruct-dpo.yaml", "report/workflow.rst"):
        assert (snakefile.parent.parent / part).is_file(), part


def test_the_demo_runs_to_its_report_in_the_users_folder(user):
    results = user.project / "results"
    assert (results / "report.html").is_file()
    assert (results / "eval/aligned.json").is_file() and (user.project / "logs/align.log").is_file()
    assert list((results / "checkpoints").iterdir()), "checkpoints live in the user's folder"
    loaded = user.run(user.bin / "python", "-c",
                      "from transformers import AutoModelForCausalLM as M; "
                      "print(M.from_pretrained('results/aligned').num_parameters())")
    assert int(loaded.stdout.strip().splitlines()[-1]) > 0
    code = [p for p in user.project.rglob("*") if p.suffix in (".py", ".smk") and ".snakemake" not in p.parts]
    assert not code, f"LexAlign's code was copied into the project: {code}"


def test_a_second_run_plans_nothing(user):
    assert "Nothing to be done" in user.plan().stdout


def test_reinstalling_the_same_wheel_reruns_nothing(user):
    """pip writes every file anew (new modification times): the code inputs are compared by content."""
    user.pip("--force-reinstall", "--no-deps", user.wheel)
    assert "Nothing to be done" in user.plan().stdout


def test_an_upgrade_reruns_exactly_the_steps_whose_code_changed(user, tmp_path):
    # lexalign/evaluation/report.py is run by the report step alone (its code inputs, lexalign/pipeline/code_inputs.py).
    module = user.source / "lexalign" / "evaluation" / "report.py"
    module.write_text(module.read_text() + "\n# changed in the next release\n")
    upgrade = _build_wheel(user.source, tmp_path / "wheel-2")
    user.pip("--force-reinstall", "--no-deps", upgrade)
    plan = user.plan()
    assert planned_jobs(plan.stdout) == {"report": 1, "all": 1}, plan.stdout[-3000:]
    assert "site-packages/lexalign/evaluation/report.py" in plan.stdout  # the reason names the installed file
    user.run(user.bin / "snakemake", "--cores", "2", "results/report.html", timeout=600)
    assert "Nothing to be done" in user.plan().stdout


def test_the_wheel_carries_the_package_and_the_workflow_and_no_test_scaffolding(user):
    """The wheel's file list: every module of the package and the bundled workflow, and nothing the tests or the
    benchmarks use alone (testkit/: the zoo, the SLURM cluster)."""
    import zipfile

    names = zipfile.ZipFile(user.wheel).namelist()
    modules = {str(p.relative_to(REPO)) for p in (REPO / "lexalign").rglob("*.py") if "_workflow" not in p.parts}
    assert modules <= set(names), sorted(modules - set(names))
    assert "lexalign/config/config.schema.yaml" in names and "lexalign/_workflow/workflow/Snakefile" in names
    scaffolding = [n for n in names if n.startswith(("testkit/", "tests/", "benchmarks/"))
                   or n.endswith(("/zoo.py", "/slurm_cluster.py", "/hub_server.py", "/conftest.py"))]
    assert not scaffolding, scaffolding
    assert {n.split("/")[0] for n in names} == {"lexalign", f"lexalign-{user.wheel.name.split('-')[1]}.dist-info"}
