"""The design's error scenarios, through the CLI and through snakemake: a clear message, never a traceback.

Paths are tried missing, empty and of the wrong kind. Scenarios 4, 6 and 7 (CUDA unavailable, an interrupted
run, out of memory) are also covered where training runs: test_cli, test_finetune, test_align_dpo, test_faults.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

from workflow import copy_workflow, snakemake

LEXALIGN = str(Path(sys.executable).parent / "lexalign")


def lexalign(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LEXALIGN, *args], capture_output=True, text=True, timeout=300)


def clean(result: subprocess.CompletedProcess) -> str:
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in out
    return out


def bad_model(tmp_path: Path, kind: str) -> Path:
    """A model path that is missing, an empty folder, a file, or a training checkpoint (no model in it)."""
    path = tmp_path / f"model-{kind}"
    if kind == "empty":
        path.mkdir()
    elif kind == "file":
        path.write_text("not a model")
    elif kind == "checkpoint":
        path.mkdir()
        (path / "trainer_state.json").write_text("{}")
        (path / "optimizer.pt").write_bytes(b"\0")
    return path


MODEL_MESSAGES = {"missing": "Error: Model not found at", "empty": "Error: No model at",
                  "file": "Error: No model at", "checkpoint": "Error: No model at"}


@pytest.mark.parametrize("kind", list(MODEL_MESSAGES))
@pytest.mark.parametrize("command", ["align", "validate", "evaluate"])
def test_cli_model_paths(tmp_path, preference_file, command, kind):
    model = bad_model(tmp_path, kind)
    config = tmp_path / "align.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(model)}, "dataset": {"path": str(preference_file)},
                                      "alignment": {"output_dir": str(tmp_path / "out")}}))
    extra = ["--output", str(tmp_path / "v")] if command == "validate" else []
    out = clean(lexalign(command, "--config", str(config), *extra))
    assert f'{MODEL_MESSAGES[kind]} "{model}" (model.path in {config})' in out
    if kind != "missing":
        assert "Missing:" in out or "It is a file" in out
    assert "→" in out


@pytest.mark.parametrize("kind", list(MODEL_MESSAGES))
def test_cli_finetune_model_paths(tmp_path, kind):
    model = bad_model(tmp_path, kind)
    data = write_jsonl(tmp_path / "sft.jsonl", [{"text": "hello"}])
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(model)}, "dataset": {"path": str(data)},
                                      "finetune": {"method": "lora"}}))
    assert f'{MODEL_MESSAGES[kind]} "{model}"' in clean(lexalign("finetune", "--config", str(config)))


def _validate(tmp_path: Path, model: Path, data: Path) -> str:
    config = tmp_path / "align.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(model)}, "dataset": {"path": str(data)},
                                      "alignment": {}}))
    return clean(lexalign("validate", "--config", str(config), "--output", str(tmp_path / "out")))


def test_cli_dataset_missing_a_field(tmp_path, demo_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c", "meta": 1}])
    out = _validate(tmp_path, demo_model_dir, data)
    assert 'Error: Dataset missing required field "rejected"' in out
    assert "Available fields: prompt, chosen, meta" in out
    assert "→ Expected format: {prompt: str, chosen: str, rejected: str}" in out
    assert not (tmp_path / "out").exists(), "nothing half-written"


def test_cli_dataset_of_an_unsupported_format(tmp_path, demo_model_dir):
    data = tmp_path / "d.txt"
    data.write_text("prompt chosen rejected\n")
    out = _validate(tmp_path, demo_model_dir, data)
    assert 'Error: Unsupported dataset format "txt"' in out
    assert "Supported formats: auto, json, jsonl" in out


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_cli_dataset_paths(tmp_path, demo_model_dir, kind):
    data = tmp_path / "data"
    if kind == "empty":
        data.mkdir()
    out = _validate(tmp_path, demo_model_dir, data)
    expected = "Error: Dataset not found at" if kind == "missing" else "Error: No data at"
    assert f'{expected} "{data}" (dataset.path in' in out


# --- through snakemake ---------------------------------------------------------------------------------


def pipeline(tmp_path: Path, **changes) -> Path:
    workdir = copy_workflow(tmp_path / "wf")
    config = {"model": {"source": "demo"}, "preference_data": {"source": "demo", "max_length": 64},
              "finetune": {"method": "none"}, "alignment": {"method": "dpo", "max_length": 64}}
    for key, value in changes.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


@pytest.mark.parametrize("kind", list(MODEL_MESSAGES))
def test_pipeline_model_paths_stop_the_plan(tmp_path, kind):
    model = bad_model(tmp_path, kind)
    workdir = pipeline(tmp_path, model={"source": None, "path": str(model)})
    out = clean(snakemake(workdir, "-n", "results/aligned"))
    assert f'{MODEL_MESSAGES[kind]} "{model}" (model.path)' in out


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_pipeline_data_paths_stop_the_plan(tmp_path, kind):
    data = tmp_path / "prefs"
    if kind == "empty":
        data.mkdir()
    workdir = pipeline(tmp_path, preference_data={"source": None, "path": str(data)})
    out = clean(snakemake(workdir, "-n", "results/aligned"))
    expected = "Dataset not found at" if kind == "missing" else "No data at"
    assert f'{expected} "{data}" (preference_data.path)' in out


@pytest.mark.parametrize(("change", "expected"), [
    ({"alignment": {"method": "gdpo", "group_delay_size": 1}}, "group_delay_size must be >= 2 (got: 1)"),
    ({"model": {"source": "demo", "repo_id": "Qwen/Qwen2.5-0.5B-Instruct"}},
     'model.source is "demo" but model.repo_id is set'),
    ({"finetune": {"method": "lora"}}, 'Missing required key "sft_data"'),
])
def test_pipeline_config_errors(tmp_path, change, expected):
    assert expected in clean(snakemake(pipeline(tmp_path, **change), "-n", "results/aligned"))


@pytest.mark.slow
@pytest.mark.parametrize(("rows", "name", "expected"), [
    ([{"prompt": "p", "chosen": "c", "meta": 1}], "d.jsonl",
     ['Error: Dataset missing required field "rejected"', "Available fields: prompt, chosen, meta"]),
    (None, "d.txt", ['Error: Unsupported dataset format "txt"']),
])
def test_pipeline_data_errors_name_the_problem(tmp_path, rows, name, expected):
    data = tmp_path / name
    if rows is None:
        data.write_text("prompt chosen rejected\n")
    else:
        write_jsonl(data, rows)
    workdir = pipeline(tmp_path, preference_data={"source": None, "path": str(data)})
    result = snakemake(workdir, "--cores", "1", "results/data/preferences")
    out = clean(result)
    for line in expected:
        assert line in out
    log = (workdir / "logs" / "validate_preferences.log").read_text()
    assert expected[0] in log and "Traceback" not in log
    assert not (workdir / "results" / "data" / "preferences").exists()
