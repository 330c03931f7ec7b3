"""Your own model and data through the pipeline: an instruct model aligned as it is (finetune.method none)
on UltraFeedback-binarized's layout, and every path checked when Snakemake plans the DAG."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from workflow import PLANTED_TOKEN, copy_workflow, planned_jobs, snakemake

NAMES = ["Amir", "Paula", "Uma", "Ivan", "George", "Mallory", "Walter", "Zoë", "Chloé", "Søren", "Ana", "Bo"]


def ultrafeedback_binarized(root: Path, n_train: int = 24, n_test: int = 8) -> Path:
    """HuggingFaceH4/ultrafeedback_binarized's layout: split files under data/, chosen and rejected as whole
    conversations ({role, content} lists), a prompt string, scores."""
    def rows(start: int, n: int) -> list[dict]:
        out = []
        for i in range(start, start + n):
            name = f"{NAMES[i % len(NAMES)]} {i}"
            prompt = f"Say hello to {name}."
            out.append({
                "prompt": prompt, "prompt_id": f"{i:04x}",
                "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"Hello {name}!"}],
                "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"Go away {name}."}],
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"Hello {name}!"}],
                "score_chosen": 9.0, "score_rejected": 2.0,
            })
        return out

    data = root / "data"
    data.mkdir(parents=True)
    pd.DataFrame(rows(0, n_train)).to_parquet(data / "train_prefs-00000-of-00001.parquet")
    pd.DataFrame(rows(n_train, n_test)).to_parquet(data / "test_prefs-00000-of-00001.parquet")
    pd.DataFrame(rows(100, 4)).to_parquet(data / "train_sft-00000-of-00001.parquet")
    return root


def own_config(model: Path, data: Path) -> dict:
    return {
        "seed": 0,
        "device": "cuda",  # on a machine without a GPU: the design's warning, then the CPU
        "model": {"path": str(model)},
        "preference_data": {"path": str(data), "train_split": "train_prefs", "eval_split": "test_prefs",
                            "max_length": 256},
        "finetune": {"method": "none"},
        "alignment": {"method": "dpo", "max_steps": 2, "batch_size": 4, "gradient_accumulation_steps": 1,
                      "learning_rate": 5e-3, "warmup_steps": 0, "max_length": 256, "lora_r": 4, "lora_alpha": 8,
                      "target_modules": "all-linear", "logging_steps": 1},
        "evaluate": {"judge": "none", "num_prompts": 4, "max_new_tokens": 8},
    }


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def own_run(zoo_models, tmp_path_factory):
    """One real pipeline run: the zoo's Llama-3-style instruct model, aligned as it is."""
    root = tmp_path_factory.mktemp("own")
    workdir = copy_workflow(root / "workflow")
    model = zoo_models("llama3")
    write_config(workdir, own_config(model, ultrafeedback_binarized(root / "ultrafeedback")))
    dry = snakemake(workdir, "-n", "results/aligned", "results/eval/aligned.json")
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    result = snakemake(workdir, "--cores", "2", "results/aligned", "results/eval/aligned.json")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert PLANTED_TOKEN not in result.stdout + result.stderr
    return {"workdir": workdir, "model": model, "dry": dry.stdout}


@pytest.mark.slow
def test_method_none_plans_no_sft(own_run):
    jobs = planned_jobs(own_run["dry"])
    assert jobs == {"download_model": 1, "download_data": 1, "validate_preferences": 1, "reference": 1,
                    "align": 1, "evaluate": 1}
    assert "sft_data" not in own_run["dry"] and "results/models/sft" not in own_run["dry"]


@pytest.mark.slow
def test_method_none_aligns_the_model_itself(own_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir, model = own_run["workdir"], own_run["model"]
    aligned = workdir / "results" / "aligned"
    loaded = AutoModelForCausalLM.from_pretrained(aligned)
    tokenizer = AutoTokenizer.from_pretrained(aligned)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello to Bo."}], tokenize=True,
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert loaded.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] > prompt["input_ids"].shape[1]
    # The reference is the downloaded model itself, said in lineage.json and the card; no copy of the weights.
    lineage = json.loads((aligned / "lineage.json").read_text())
    assert lineage["reference_model"]["sft"] is False
    assert lineage["reference_model"]["path"] == "results/models/base"
    assert "no SFT step" in (aligned / "README.md").read_text()
    base = workdir / "results" / "models" / "base" / "model.safetensors"
    assert base.stat().st_ino == (model / "model.safetensors").stat().st_ino, "the weights were copied"
    assert not (workdir / "results" / "models" / "sft").exists()
    # The eval split came from test_prefs, the training rows from train_prefs.
    report = json.loads((workdir / "results" / "data" / "preferences" / "report.json").read_text())
    assert (report["train_rows"], report["eval_rows"], report["chat_template"]) == (24, 8, True)
    result = json.loads((workdir / "results" / "eval" / "aligned.json").read_text())
    assert result["pairs"] == 8


@pytest.mark.slow
def test_cuda_asked_for_without_a_gpu_warns_in_the_pipeline(own_run):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the warning is for machines without one")
    log = (own_run["workdir"] / "logs" / "align.log").read_text()
    assert "Warning: CUDA requested but unavailable. Using CPU." in log


@pytest.mark.slow
def test_changing_the_model_path_to_nothing_stops_the_plan(own_run, tmp_path):
    """After a good run, a model.path that does not exist (or holds no model) is an error, not "Nothing to be
    done" with the old model standing."""
    workdir = own_run["workdir"]
    config_file = workdir / "config" / "config.yaml"
    good = config_file.read_text()
    config = yaml.safe_load(good)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a model")
    try:
        for path, message in ((tmp_path / "missing", "Model not found at"), (tmp_path / "empty", "No model at"),
                              (tmp_path / "a-file", "No model at")):
            write_config(workdir, {**config, "model": {"path": str(path)}})
            result = snakemake(workdir, "-n", "results/aligned")
            assert result.returncode != 0
            assert f'{message} "{path}" (model.path)' in result.stdout + result.stderr
            assert "Traceback" not in result.stdout + result.stderr
    finally:
        config_file.write_text(good)
    assert "Nothing to be done" in snakemake(workdir, "-n", "results/aligned").stdout
