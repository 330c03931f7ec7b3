"""What a plan keeps between runs (lexalign/pipeline/plan_cache.py, lexalign/pipeline/plan.py): the checked
config and the code inputs, recomputed whenever the config or any package file changes, never a failure, and the
warnings said on every run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from lexalign.pipeline import plan_cache
from lexalign.pipeline.plan_cache import package_digest, remembered
from workflow import copy_workflow, snakemake


def test_a_value_is_computed_once_for_the_same_inputs_and_its_warnings_said_every_time(tmp_path, capsys):
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            print(f"Warning: computed {value}", file=sys.stderr)
            return {"value": value, "list": [1, 2.5, None]}
        return run

    first = remembered("probe", {"a": 1}, compute(1), directory=tmp_path)
    again = remembered("probe", {"a": 1}, compute(99), directory=tmp_path)
    assert first == again == {"value": 1, "list": [1, 2.5, None]} and calls == [1]
    assert capsys.readouterr().err == "Warning: computed 1\n" * 2
    assert remembered("probe", {"a": 2}, compute(2), directory=tmp_path)["value"] == 2 and calls == [1, 2]


def test_a_failure_or_a_value_that_json_would_change_is_not_kept(tmp_path):
    def fail():
        raise ValueError("bad config")

    with pytest.raises(ValueError):
        remembered("probe", 1, fail, directory=tmp_path)
    assert not (tmp_path / "probe.json").exists()
    assert remembered("probe", 1, lambda: (1, 2), directory=tmp_path) == (1, 2)  # a tuple reads back as a list
    assert not (tmp_path / "probe.json").exists()
    (tmp_path / "probe.json").write_text("{not json")  # a torn or foreign file: recomputed, replaced
    assert remembered("probe", 1, lambda: [3], directory=tmp_path) == [3]
    assert json.loads((tmp_path / "probe.json").read_text())["value"] == [3]


def test_the_package_digest_follows_every_source_file_but_not_bytecode(tmp_path):
    root = tmp_path / "pkg"
    shutil.copytree(plan_cache.PACKAGE_DIR, root, ignore=shutil.ignore_patterns("__pycache__", "_workflow"))
    digest = package_digest.__wrapped__
    before = digest(root)
    (root / "__pycache__").mkdir(exist_ok=True)
    (root / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert digest(root) == before
    schema = next((root / "config").glob("*.yaml"))
    schema.write_text(schema.read_text() + "\n")
    after_schema = digest(root)
    module = root / "generation" / "completion_scores.py"
    module.write_text(module.read_text() + "\n# edited\n")
    assert len({before, after_schema, digest(root)}) == 3
    module.rename(root / "generation" / "scored.py")  # a rename alone changes what imports find
    assert digest(root) not in {before, after_schema}


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("plan-cache"))


def _imported_on_reading(workdir) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`snakemake --list-rules` (the workflow read, no DAG: a dry run with jobs to show imports jsonschema for
    Snakemake's notebook support), and the top-level packages its process imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "snakemake", "--list-rules"], cwd=workdir,
                            capture_output=True, text=True, timeout=300)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    return result, imported


@pytest.mark.slow
def test_a_second_plan_reads_what_the_first_kept_and_a_changed_config_is_checked_again(workflow_copy):
    first, imported = _imported_on_reading(workflow_copy)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "jsonschema" in imported  # the first reading checks the config
    kept = json.loads((workflow_copy / ".snakemake" / "lexalign" / "config.json").read_text())
    assert kept["value"]["config"]["alignment"]["beta"] == 0.1
    second, imported = _imported_on_reading(workflow_copy)
    assert second.returncode == 0 and second.stdout == first.stdout and "align" in second.stdout.split()
    assert "jsonschema" not in imported and "lexalign" in imported

    # A config the method does not fit: warned on every plan, kept or not.
    path = workflow_copy / "config" / "config.yaml"
    original = path.read_text()
    config = yaml.safe_load(original)
    config["alignment"]["group_delay_size"] = 3  # a GDPO key under method dpo
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    warned = [snakemake(workflow_copy, "-n").stderr for _ in range(2)]
    assert all("group_delay_size" in err and "Warning" in err for err in warned), warned[1][-2000:]

    # A changed config is checked again, never read from what an earlier one kept.
    config["alignment"]["beta"] = -1
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    bad = snakemake(workflow_copy, "-n")
    said = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "alignment.beta" in said and "Traceback" not in said, said
    path.write_text(original)
    assert snakemake(workflow_copy, "-n").returncode == 0


@pytest.mark.slow
def test_an_edited_import_changes_the_kept_code_inputs(workflow_copy):
    """A module that starts importing another: the steps that run it now have the other among their code
    inputs, though the kept entry was written before the edit."""
    assert snakemake(workflow_copy, "-n").returncode == 0
    kept = workflow_copy / ".snakemake" / "lexalign" / "code-inputs.json"
    before = json.loads(kept.read_text())["value"]
    assert "generation/judges.py" not in before["publish"]
    module = workflow_copy / "lexalign" / "hub" / "__init__.py"
    original = module.read_text()
    module.write_text(original + "\n\ndef _probe():\n    from lexalign.generation import judges  # noqa: F401\n")
    try:
        assert snakemake(workflow_copy, "-n").returncode == 0
        after = json.loads(kept.read_text())["value"]
        assert "generation/judges.py" in after["publish"]
    finally:
        module.write_text(original)
