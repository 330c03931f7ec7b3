"""A project of the user's own (`lexalign init`), the catalog's layout (snakedeploy), the software environments.

The wheel itself, installed in a fresh venv and run as a user runs it, is tests/test_installed.py.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import REPO

from lexalign.config.annotated import render_config
from lexalign.config.loader import _resolve, _root_schema, load_yaml, validate_config
from lexalign.methods import key_owner
from lexalign.pipeline import code_inputs, workflow_files
from lexalign.pipeline.rules import STEP_OF_RULE, rule_sources
from workflow import copy_workflow, planned_jobs, snakemake

LEXALIGN = str(Path(sys.executable).parent / "lexalign")
EXAMPLES = sorted(workflow_files.examples())


def lexalign(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LEXALIGN, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


# --- the commented config ----------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES)
def test_each_example_renders_to_exactly_its_config(example):
    values = load_yaml(workflow_files.examples()[example])
    rendered = render_config(values)
    assert validate_config(yaml.safe_load(rendered), "pipeline") == validate_config(values, "pipeline")


def _schema_keys(schema: dict, root: dict, path: str = "") -> list[str]:
    keys = []
    for key, sub in schema.get("properties", {}).items():
        sub = _resolve(sub, root)
        keys.append(f"{path}{key}")
        if sub.get("type") == "object" and "properties" in sub:
            keys += _schema_keys(sub, root, f"{path}{key}.")
    return keys


def test_the_rendered_config_has_every_key_of_the_schema_with_its_meaning():
    root = _root_schema()
    text = render_config(load_yaml(workflow_files.examples()["gdpo"]))
    lines = text.splitlines()
    for dotted in _schema_keys(root, root):
        key = dotted.rsplit(".", 1)[-1]
        depth = dotted.count(".")
        pattern = re.compile(rf"^{'  ' * depth}(# )?{re.escape(key)}:")
        at = [i for i, line in enumerate(lines) if pattern.match(line)]
        assert at, f"{dotted} is missing from the rendered config"
        assert any(lines[i - 1].lstrip().startswith("#") for i in at), f"{dotted} has no comment above it"


def test_keys_of_other_methods_are_shown_commented_out():
    text = render_config(load_yaml(workflow_files.examples()["gdpo"]))
    alignment = text.split("\nalignment:\n", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"^  # loss_type: sigmoid +\(not read by method gdpo\)$", alignment, re.M)
    assert re.search(r"^  group_delay_size: 4$", alignment, re.M)
    for key in ("desirable_weight", "gamma", "orpo_lambda", "cpo_alpha"):
        assert key_owner(key) not in (None, "gdpo")
        assert re.search(rf"^  # {key}: ", alignment, re.M), key


# --- lexalign init ---------------------------------------------------------------------------------


def test_init_writes_a_project_that_plans_the_example(tmp_path):
    target = tmp_path / "my-align"
    result = lexalign("init", str(target), "--example", "instruct-dpo")
    assert result.returncode == 0, result.stderr
    assert (target / "Snakefile").is_file() and (target / "README.md").is_file()
    assert (target / "profiles/default/config.yaml").is_file() and (target / "profiles/slurm/config.yaml").is_file()
    assert not list(target.rglob("*.py")) and not list(target.rglob("*.smk")), "no LexAlign code in the project"
    config = validate_config(load_yaml(target / "config/config.yaml"), "pipeline")
    assert config["finetune"]["method"] == "none"
    assert config["preference_data"]["repo_id"] == "HuggingFaceH4/ultrafeedback_binarized"
    plan = snakemake(target, "-n")
    assert plan.returncode == 0, plan.stderr[-3000:]
    # No SFT job with finetune.method none; the Hub model and data are downloaded, then validated and aligned.
    assert planned_jobs(plan.stdout) == {"download_model": 1, "download_data": 1, "validate_preferences": 1,
                                         "reference": 1, "align": 1, "evaluate": 1, "report": 1, "all": 1}
    assert not (target / "results").exists(), "a dry run writes no results"


def workflow_files_readme(example: str) -> str:
    from lexalign.pipeline.project import project_files

    return project_files(example, "p")["README.md"]


def test_the_smollm2_project_says_how_to_fetch_what_it_reads(tmp_path):
    """The smollm2 example reads files from the package registry (assets/): init says to fetch them first, in its
    next steps and the project's README, and a plan without them names the file and the command that writes it."""
    target = tmp_path / "smol"
    result = lexalign("init", str(target), "--example", "smollm2")
    assert result.returncode == 0, result.stderr
    assert f"Next: cd {target} && lexalign fetch smollm2" in result.stdout, result.stdout
    readme = (target / "README.md").read_text()
    assert "lexalign fetch smollm2" in readme
    # It runs the rounds alone (online.offline false): the README's target is the rounds' final model, not the
    # offline pipeline's results/aligned (which would align the demo's preference data instead).
    assert "snakemake --cores 1 results/online/final" in readme and "results/aligned" not in readme
    assert "snakemake --cores 1 results/aligned" in workflow_files_readme("demo")
    assert "smollm2" in lexalign("init", "--help").stdout
    plan = snakemake(target, "-n")
    output = plan.stdout + plan.stderr
    assert plan.returncode != 0 and "Traceback (most recent call last)" not in output, output[-3000:]
    assert 'GGUF file not found: "assets/SmolLM2-135M-Instruct.gguf" (model.path)' in output, output[-3000:]
    assert "Run: lexalign fetch smollm2 --into assets" in output, output[-3000:]


def test_init_refuses_a_non_empty_folder_and_never_overwrites_a_config(tmp_path):
    target = tmp_path / "p"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    refused = lexalign("init", str(target))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f'"{target}" is not empty' in refused.stderr and "--force" in refused.stderr
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"], "a refused init writes nothing"

    (target / "config").mkdir()
    mine = "# my own config\nmodel: {source: demo}\npreference_data: {source: demo}\nfinetune: {}\nalignment: {}\n"
    (target / "config/config.yaml").write_text(mine)
    forced = lexalign("init", str(target), "--example", "gdpo", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (target / "config/config.yaml").read_text() == mine
    assert "config/config.gdpo.yaml" in forced.stderr and "was kept" in forced.stderr
    assert validate_config(load_yaml(target / "config/config.gdpo.yaml"), "pipeline")["alignment"]["method"] == "gdpo"
    assert (target / "notes.txt").read_text() == "mine"


def test_init_names_the_examples_when_one_is_unknown(tmp_path):
    result = lexalign("init", str(tmp_path / "x"), "--example", "nope")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert 'No example called "nope"' in result.stderr
    assert all(name in result.stderr for name in ("demo", "instruct-dpo", "base-sft-dpo", "gdpo"))
    assert not (tmp_path / "x").exists()


def test_workflow_path_prints_the_snakefile_this_lexalign_runs():
    result = lexalign("workflow-path")
    assert result.returncode == 0
    path = Path(result.stdout.strip())
    assert path == workflow_files.snakefile() and path.is_file() and path.name == "Snakefile"
    assert "use rule" not in path.read_text() and "rule all:" in path.read_text()


# --- code inputs: the files of the lexalign that runs, and the rule's script ---------------------------


def test_every_rule_lists_its_script_among_its_code_inputs():
    for rule in STEP_OF_RULE:
        sources = rule_sources(rule)
        assert sources[-1] == workflow_files.workflow_root() / "scripts" / "step.py"
        assert all(path.is_file() for path in sources)


def test_code_paths_are_relative_inside_the_working_directory_and_absolute_outside(tmp_path, monkeypatch):
    inside = tmp_path / "lexalign" / "steps" / "training.py"
    inside.parent.mkdir(parents=True)
    inside.write_text("")
    monkeypatch.chdir(tmp_path)
    assert workflow_files.code_path(inside) == "lexalign/steps/training.py"
    outside = REPO / "lexalign" / "steps" / "training.py"
    assert workflow_files.code_path(outside) == str(outside)


def test_the_import_scan_finds_what_a_walk_of_each_whole_file_finds():
    """code_inputs reads import statements from the text (fast planning); the full AST must agree, file by file,
    but for the modules the method registry names, which the files that resolve its references add."""
    references = code_inputs._registry_references(code_inputs.ROOT)
    resolving = set()
    for path in sorted(code_inputs.ROOT.rglob("*.py")):
        walked = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            walked |= set(code_inputs._imported(node, code_inputs.ROOT).values())
        found = code_inputs._imports_of(path, code_inputs.ROOT)
        assert walked <= found and found - walked <= references, path
        if found - walked:
            resolving.add(str(path.relative_to(code_inputs.ROOT)))
    # The calls of Method.trainer_setup and Method.loss_function, found by a walk of each file's tree.
    calls = {str(path.relative_to(code_inputs.ROOT)) for path in code_inputs.ROOT.rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("trainer_setup", "loss_function")}
    assert resolving <= calls and "train/align.py" in calls and references == {
        "lexalign.train.dpo_trainer", "lexalign.train.ranked_trainer", "lexalign.train.kto_trainer",
        "lexalign.train.reference_free_trainer", "lexalign.methods.gdpo", "lexalign.methods.reference_free"}


# --- the catalog's layout ------------------------------------------------------------------------------


@pytest.mark.slow
def test_snakedeploy_from_a_local_clone_plans_the_demo_and_lints_clean(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    # The working tree as it is now (the clone has the last commit): the catalog files of this checkout.
    for name in ("workflow", "rules", "scripts", "config", "profiles", "envs", "report", "lexalign", "Snakefile",
                 ".snakemake-workflow-catalog.yml"):
        source, target = REPO / name, clone / name
        if target.is_dir():
            shutil.rmtree(target)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    deployed = tmp_path / "deployed"
    snakedeploy = str(Path(sys.executable).parent / "snakedeploy")
    result = subprocess.run([snakedeploy, "deploy-workflow", str(clone), str(deployed), "--branch", "main"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    module = (deployed / "workflow/Snakefile").read_text()
    # snakedeploy 0.17's Local provider writes the module's path relative to the clone ("workflow/Snakefile"),
    # which Snakemake reads relative to the deployed workflow/ folder; the GitHub provider writes github(...).
    # Point it at the clone, as a catalog user's github(...) points at the repository.
    assert '"workflow/Snakefile"' in module and "use rule * from" in module
    # (Relative, from the deployed workflow/ folder: --lint refuses absolute paths.)
    to_clone = os.path.relpath(clone / "workflow" / "Snakefile", deployed / "workflow")
    (deployed / "workflow/Snakefile").write_text(module.replace('"workflow/Snakefile"', f'"{to_clone}"'))
    assert (deployed / "config/config.yaml").is_file() and (deployed / "profiles/default/config.yaml").is_file()
    plan = snakemake(deployed, "-n")
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = planned_jobs(plan.stdout)
    assert {"download_model", "finetune", "validate_preferences", "align", "evaluate", "report", "all"} <= set(jobs)
    lint = snakemake(deployed, "--lint")
    assert lint.returncode == 0 and "Congratulations, your workflow is in a good condition" in lint.stderr, \
        lint.stdout[-3000:] + lint.stderr[-2000:]


def test_the_catalog_file_and_config_readme_are_there():
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert catalog["usage"]["mandatory-flags"]["flags"]
    assert catalog["usage"]["software-stack-deployment"]["conda"] is True
    assert catalog["usage"]["report"] is True
    readme = (REPO / "config/README.md").read_text()
    assert all(name in readme for name in EXAMPLES)
    assert (REPO / "workflow/Snakefile").is_file() and (REPO / "Snakefile").is_file()


# --- software environments ---------------------------------------------------------------------------


OPTIONAL = {"liger_kernel", "liger-kernel", "mlflow-skinny", "wandb", "trackio", "vllm"}
"""Imported only when installed (guarded imports): the kernels, the `tracking` extra's trackers, and the `vllm`
extra's sampling engine (online.sampling.engine: vllm names the extra when it is missing; vLLM brings its own CUDA
torch, so no env file pins it)."""


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _step_distributions() -> set[str]:
    """The third-party distributions the steps' modules import (from their import closures)."""
    distributions = packages_distributions()
    found = set()
    for step in set(STEP_OF_RULE.values()):
        for path in code_inputs.step_sources(step):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "lexalign":
                        found.update(d.lower().replace("_", "-") for d in distributions.get(top, [top]))
    return found - OPTIONAL


@pytest.mark.parametrize("variant,torch", [("cpu", "pytorch-cpu"), ("cuda", "pytorch-gpu")])
def test_the_env_files_list_what_the_steps_import(variant, torch):
    env = yaml.safe_load((REPO / "envs" / f"lexalign-{variant}.yaml").read_text())
    assert env["channels"][0] == "conda-forge"
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert any(d.startswith(torch) for d in conda), conda
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    expected = [r for r in pyproject["dependencies"] if _requirement_name(r) != "torch"]
    extras = pyproject["optional-dependencies"]["eval"] + pyproject["optional-dependencies"]["ifeval"]
    assert pip == expected + list(dict.fromkeys(extras)), "the env's bounds are pyproject's"
    listed = {_requirement_name(r) for r in pip} | {"torch", "numpy"}  # numpy comes with torch
    # Distributions pulled in by a listed package (tokenizers' and datasets' own dependencies).
    transitive = {"xxhash", "pyyaml"}
    missing = _step_distributions() - listed - transitive
    assert not missing, f"steps import {sorted(missing)}, which envs/lexalign-{variant}.yaml does not list"


RULE_ENVS = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, ResourceSettings
with SnakemakeApi() as api:
    wf = api.workflow(resource_settings=ResourceSettings(), snakefile=Path("Snakefile"), workdir=Path("."),
                      config_settings=ConfigSettings(config={"device": sys.argv[1]}))
    print(json.dumps({r.name: [r.conda_env, str(Path(r.basedir) / r.conda_env) if r.conda_env else None,
                               bool(r.script)] for r in wf._workflow.rules}))
"""


@pytest.mark.parametrize("device,env", [("cpu", "lexalign-cpu.yaml"), ("auto", "lexalign-cuda.yaml")])
def test_every_rule_runs_in_the_environment_of_the_device(tmp_path, device, env):
    """What `--sdm conda` would build for each rule, read from the parsed workflow (conda itself, and so
    `--containerize`, cannot run here: no conda channel can be reached from this machine)."""
    workdir = copy_workflow(tmp_path / "wf")
    result = subprocess.run([sys.executable, "-c", RULE_ENVS, device], cwd=workdir, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rules = yaml.safe_load(result.stdout.strip().splitlines()[-1])
    steps = {name: value for name, value in rules.items() if value[2]}  # rules that run a script: every step
    assert set(steps) == set(STEP_OF_RULE)
    for name, (declared, path, _) in steps.items():
        assert declared == f"../envs/{env}", name
        assert Path(path).resolve() == (workdir / "envs" / env).resolve() and Path(path).is_file(), name
