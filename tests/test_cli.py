"""The `lexalign` CLI: config errors, dry runs, and each step run for real on the demo model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_jsonl

LEXALIGN = str(Path(sys.executable).parent / "lexalign")


def lexalign(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([LEXALIGN, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def align_config(tmp_path: Path, model: Path, data: Path, **alignment) -> dict:
    return {
        "model": {"path": str(model)},
        "dataset": {"path": str(data), "max_length": 64, "eval_fraction": 0.2},
        "alignment": {"output_dir": str(tmp_path / "aligned"), "checkpoint_dir": str(tmp_path / "ckpt"),
                      "learning_rate": "1e-3", "batch_size": 8, "gradient_accumulation_steps": 1,
                      "num_epochs": 1, "warmup_steps": 0, "max_length": 64, "lora_dropout": 0.0, "logging_steps": 2,
                      **alignment},
        "device": "cpu",
    }


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, lexalign.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    result = lexalign("--help")
    assert result.returncode == 0
    for command in ("download", "finetune", "validate", "align", "evaluate"):
        assert command in result.stdout


def test_example_configs_are_valid():
    from lexalign.config.loader import load_config

    assert load_config(REPO / "config/align.yaml.example", "align")["alignment"]["learning_rate"] == 1e-5
    assert load_config(REPO / "config/finetune.yaml.example", "finetune")["finetune"]["method"] == "lora"


def test_dry_run_shows_config_and_plan_without_loading(tmp_path):
    config = write_config(tmp_path / "align.yaml", align_config(tmp_path, tmp_path / "no-model", tmp_path / "d.jsonl"))
    result = lexalign("align", "--config", str(config), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "# Resolved align configuration" in result.stdout
    assert "learning_rate: 0.001" in result.stdout  # '1e-3' was read as a number
    assert "reference model:" in result.stdout


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"alignment": {"betaa": 0.1}}, ['Unknown key "alignment.betaa"', 'Did you mean "beta"?']),
        ({"alignment": {"beta": "strong"}}, ['Invalid value for "alignment.beta"', "Found: 'strong' (a string)",
                                             "Expected: a number"]),
        ({"alignment": {"method": "ppo"}}, ['Invalid value for "alignment.method"', "Expected: one of: dpo, gdpo"]),
        ({"alignment": {"group_delay_size": 1}}, ["Error: group_delay_size must be >= 2 (got: 1)",
                                                  "→ Need at least chosen + rejected responses"]),
        ({"alignment": {"loss_type": "nope"}}, ['Unknown loss_type "nope"']),
        ({"device": "tpu"}, ['Invalid value for "device"', "Expected: one of: auto, cuda, cpu"]),
    ],
)
def test_config_errors_are_clear(tmp_path, change, expected):
    config = align_config(tmp_path, tmp_path / "m", tmp_path / "d.jsonl")
    for key, value in change.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    result = lexalign("align", "--config", str(write_config(tmp_path / "align.yaml", config)), "--dry-run")
    assert result.returncode == 1
    for line in expected:
        assert line in result.stderr
    assert "Traceback" not in result.stderr


def test_yaml_python_tags_are_refused(tmp_path):
    config = tmp_path / "evil.yaml"
    config.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    result = lexalign("align", "--config", str(config), "--dry-run")
    assert result.returncode == 1
    assert "uses a YAML tag that is not allowed" in result.stderr
    assert "pwned" not in result.stdout + result.stderr


def test_missing_model_says_which_command_makes_it(tmp_path, preference_file, demo_model_dir):
    config = align_config(tmp_path, tmp_path / "missing-model", preference_file)
    config["model"]["base_model"] = str(demo_model_dir)  # a tokenizer, so validation passes
    result = lexalign("align", "--config", str(write_config(tmp_path / "align.yaml", config)))
    assert result.returncode == 1
    assert f'Error: Model not found at "{tmp_path / "missing-model"}"' in result.stderr
    assert "→ Run: lexalign finetune --config" in result.stderr


def test_validate_writes_the_four_outputs(tmp_path, preference_file, demo_model_dir):
    config = write_config(tmp_path / "align.yaml", align_config(tmp_path, demo_model_dir, preference_file))
    result = lexalign("validate", "--config", str(config), "--output", str(tmp_path / "valid"))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "valid").iterdir())
    assert {"train.parquet", "eval.parquet", "rejects.jsonl", "report.json"} <= set(names)
    report = json.loads((tmp_path / "valid/report.json").read_text())
    assert report["train_rows"] + report["eval_rows"] + report["rejected_rows"] == 64


@pytest.mark.slow
def test_finetune_then_align_then_evaluate_from_the_cli(tmp_path, demo_model_dir):
    from transformers import AutoModelForCausalLM

    from lexalign.demo import task

    sft_data = write_jsonl(tmp_path / "sft.jsonl", task.sft_rows(0, 200))
    finetune = write_config(tmp_path / "finetune.yaml", {
        "model": {"path": str(demo_model_dir)},
        "dataset": {"path": str(sft_data)},
        "finetune": {"learning_rate": "3e-3", "batch_size": 16, "num_epochs": 1, "max_length": 64},
        "output_dir": str(tmp_path / "sft"), "checkpoint_dir": str(tmp_path / "sft-ckpt"), "device": "cpu",
    })
    result = lexalign("finetune", "--config", str(finetune))
    assert result.returncode == 0, result.stderr[-2000:]
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft")

    prefs = write_jsonl(tmp_path / "prefs.jsonl", task.preference_rows(0, 80))
    config = write_config(tmp_path / "align.yaml", align_config(tmp_path, tmp_path / "sft", prefs))
    result = lexalign("align", "--config", str(config), "--device", "cuda")
    assert result.returncode == 0, result.stderr[-2000:]
    # No GPU here: the fallback warning of the original design.
    assert "Warning: CUDA requested but unavailable. Using CPU." in result.stderr
    assert "Epoch 1/1: [" in result.stderr and "| Loss: " in result.stderr
    AutoModelForCausalLM.from_pretrained(tmp_path / "aligned")
    assert not (tmp_path / "ckpt" / "checkpoint-1").exists()
    # The reference log-probs were computed once, by the reference step, and training read them.
    assert "Reference log-probs (pairs):" in result.stdout + result.stderr
    assert list((tmp_path / "ckpt" / "reference").glob("pairs-max64.parquet"))
    again = lexalign("align", "--config", str(write_config(tmp_path / "align.yaml", align_config(
        tmp_path, tmp_path / "sft", prefs, beta=0.2))), "--device", "cpu")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Reference log-probs up to date" in again.stdout  # beta changes nothing the reference depends on

    result = lexalign("evaluate", "--config", str(config), "--output", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= metrics["preference_accuracy"] <= 1.0 and metrics["pairs"] > 0
