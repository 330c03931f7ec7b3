"""The whole Snakemake pipeline on the demo, for real, in a temporary copy of the workflow."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest
import yaml

from workflow import PLANTED_TOKEN, SNAKEMAKE, copy_workflow, edit_config, planned_jobs, snakemake  # noqa: F401


@pytest.mark.slow
def test_aligned_model_loads_and_generates(demo_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_run / "results/aligned")
    tokenizer = AutoTokenizer.from_pretrained(demo_run / "results/aligned")
    inputs = tokenizer("User: Please greet Zoe.\nAssistant:", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert completion.strip(), "the aligned model generated nothing"
    assert (demo_run / "results/aligned/model.safetensors").is_file()
    assert not list((demo_run / "results/aligned").glob("*.bin")), "weights must be safetensors"


@pytest.mark.slow
def test_alignment_visibly_works_on_the_demo(demo_run):
    result = json.loads((demo_run / "results/eval/aligned.json").read_text())
    assert result["pairs"] >= 20
    assert result["preference_accuracy"] >= 0.9
    generation = result["generation"]
    assert generation["decoding"] == "greedy" and generation["prompts"] == 40
    assert generation["aligned_rate"] - generation["sft_rate"] >= 0.30
    assert generation["sft_rate"] <= 0.5, "the SFT model should start well below the aligned one"


@pytest.mark.slow
def test_model_card_and_lineage(demo_run):
    aligned = demo_run / "results/aligned"
    card = (aligned / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    lineage = json.loads((aligned / "lineage.json").read_text())
    assert lineage["stage"] == "align"
    assert lineage["config"]["beta"] == 0.1
    assert lineage["versions"]["trl"] and lineage["versions"]["transformers"]
    assert set(lineage["inputs"]) == {"model", "data"}
    assert all(len(v["sha256"]) == 64 for v in lineage["inputs"].values())
    # The chain goes back to the download of the demo model.
    sft = lineage["parents"]["model"]
    assert sft["stage"] == "finetune"
    assert sft["parents"]["model"]["stage"] == "download"
    metrics = [json.loads(line) for line in (aligned / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in m for m in metrics)


@pytest.mark.slow
def test_validation_outputs_account_for_every_row(demo_run):
    data = demo_run / "results/data/preferences"
    report = json.loads((data / "report.json").read_text())
    rejects = (data / "rejects.jsonl").read_text().splitlines()
    assert report["train_rows"] + report["eval_rows"] + len(rejects) == report["input_rows"] == 400


@pytest.mark.slow
def test_second_run_does_nothing(demo_run):
    result = snakemake(demo_run, "--cores", "1", "results/aligned", "results/eval/aligned.json")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow
def test_beta_change_reruns_only_align_and_evaluate(demo_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(demo_run, workdir, symlinks=True)
    edit_config(workdir, "alignment", "beta", 0.2)
    result = snakemake(workdir, "-n", "--cores", "1", "results/aligned", "results/eval/aligned.json")
    assert result.returncode == 0, result.stderr[-2000:]
    # Not the reference step either: its log-probs do not depend on beta.
    assert planned_jobs(result.stdout) == {"align": 1, "evaluate": 1}
    assert "params changed" in result.stdout.lower() or "Params have changed" in result.stdout


@pytest.mark.slow
def test_finetune_change_does_not_refetch(demo_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(demo_run, workdir, symlinks=True)
    edit_config(workdir, "finetune", "learning_rate", 1e-3)
    result = snakemake(workdir, "-n", "--cores", "1", "results/aligned", "results/eval/aligned.json")
    # The reference log-probs depend on the SFT model, so they are recomputed too; downloads and data are not.
    assert planned_jobs(result.stdout) == {"finetune": 1, "reference": 1, "align": 1, "evaluate": 1}


@pytest.mark.slow
def test_code_change_reruns_the_rules_that_run_it(demo_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(demo_run, workdir, symlinks=True)
    evaluate = workdir / "lexalign" / "evaluation" / "figures.py"
    evaluate.write_text(evaluate.read_text() + "\n# edited\n")
    result = snakemake(workdir, "-n", "--cores", "1", "results/aligned", "results/eval/aligned.json")
    assert planned_jobs(result.stdout) == {"evaluate": 1}


def test_dry_run_plans_the_whole_dag(tmp_path):
    workdir = copy_workflow(tmp_path)
    result = snakemake(workdir, "-n", "--cores", "1", "results/aligned", "results/eval/aligned.json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert planned_jobs(result.stdout) == {
        "download_model": 1, "download_data": 2, "prepare_sft_data": 1, "finetune": 1,
        "validate_preferences": 1, "validate_groups": 1, "reference": 1, "align": 1, "evaluate": 1,
    }


def test_pipeline_config_error_names_key_value_and_expectation(tmp_path):
    workdir = copy_workflow(tmp_path)
    edit_config(workdir, "alignment", "beta", "high")
    result = snakemake(workdir, "-n", "--cores", "1")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert 'Invalid value for "alignment.beta"' in out
    assert "Found: 'high' (a string)" in out and "Expected: a number" in out


def test_lint_is_clean(tmp_path):
    workdir = copy_workflow(tmp_path)
    result = snakemake(workdir, "--lint")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_adding_a_sweep_run_schedules_only_that_run(demo_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(demo_run, workdir, symlinks=True)
    edit_config(workdir, "runs", "beta-0.5", {"beta": 0.5, "loss_type": "ipo"})
    result = snakemake(workdir, "-n", "--cores", "1", "sweep")
    assert result.returncode == 0, result.stderr[-2000:]
    # The demo benchmarks every run (evaluate.lm_eval): the new run gets its lm_eval_run too.
    assert planned_jobs(result.stdout) == {"align_run": 1, "evaluate_run": 1, "lm_eval_run": 1, "sweep": 1}
    assert "results/runs/beta-0.5/model" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed (make system-deps)")
def test_report_renders_with_every_image(demo_run, tmp_path):
    page = demo_run / "results/report.html"
    assert page.is_file()
    for name in ("curve_loss", "curve_rewards_margins", "eval_comparison", "length_histogram"):
        assert (demo_run / f"results/report/{name}.png").stat().st_size > 1000
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(["chromium", *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[:500]
    assert loaded.group(1) == loaded.group(2) and int(loaded.group(2)) == 5
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1100,2400", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10000


@pytest.mark.slow
def test_snakemake_report_includes_the_plots(demo_run):
    result = snakemake(demo_run, "--report", "results/snakemake-report.html")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (demo_run / "results/snakemake-report.html").stat().st_size > 10000


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz not installed (make system-deps)")
def test_dag_pictures_render(tmp_path):
    workdir = copy_workflow(tmp_path)
    for kind in ("--dag", "--rulegraph"):
        graph = snakemake(workdir, kind).stdout
        svg = subprocess.run(["dot", "-Tsvg"], input=graph, capture_output=True, text=True, check=True).stdout
        assert svg.startswith("<?xml") and "finetune" in svg and "align" in svg


@pytest.mark.slow
def test_planted_token_is_in_no_output_or_log(demo_run):
    leaked = []
    for folder in ("results", "logs", ".snakemake/log"):
        for path in (demo_run / folder).rglob("*"):
            if path.is_file() and PLANTED_TOKEN.encode() in path.read_bytes():
                leaked.append(str(path.relative_to(demo_run)))
    assert not leaked


@pytest.mark.slow
def test_a_second_run_on_the_same_results_is_refused_while_the_first_runs(tmp_path):
    workdir = copy_workflow(tmp_path)
    env = {**os.environ, "HF_TOKEN": PLANTED_TOKEN}
    first = subprocess.Popen([SNAKEMAKE, "--cores", "1", "results/models/sft"], cwd=workdir, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while not list((workdir / ".snakemake" / "locks").glob("*")) and time.time() < deadline:
            time.sleep(0.2)
        second = snakemake(workdir, "--cores", "1", "results/models/sft")
        assert second.returncode != 0
        assert "cannot be locked" in second.stdout + second.stderr
    finally:
        output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output[-2000:]
    assert (workdir / "results/models/sft/model.safetensors").is_file()


# --- a sweep of every method from one SFT model and one validated dataset -------------------------------------


NEW_RUNS = {
    "orpo": {"method": "orpo", "orpo_lambda": 0.2},
    "kto": {"method": "kto", "beta": 0.2, "desirable_weight": 1.2},
    "simpo": {"method": "simpo", "beta": 2.0, "gamma": 1.0},
    "cpo": {"method": "cpo", "cpo_alpha": 0.5},
}
TRAINED = ("orpo", "kto")
"""Run for real: one reference-free method and the one that reads unpaired rows. SimPO and CPO are planned only
(the same reference-free trainer as ORPO; tests/test_methods.py trains each)."""


@pytest.mark.slow
def test_a_sweep_mixes_every_method_and_reference_free_runs_plan_no_reference(demo_run, tmp_path):
    from transformers import AutoModelForCausalLM

    workdir = tmp_path / "copy"
    shutil.copytree(demo_run, workdir, symlinks=True)
    # Benchmarks off for the new runs (they have tests of their own; evaluate never reads this key).
    edit_config(workdir, "evaluate", "lm_eval", {"tasks": []})
    # A reference-free run: its align and evaluate only (no reference, no validation, no SFT).
    edit_config(workdir, "runs", "orpo", {**NEW_RUNS["orpo"], "max_steps": 3, "logging_steps": 1})
    result = snakemake(workdir, "-n", "--cores", "1", "sweep")
    assert result.returncode == 0, result.stderr[-2000:]
    assert planned_jobs(result.stdout) == {"align_run": 1, "evaluate_run": 1, "sweep": 1}
    # KTO's rows are scored once by the reference step; SimPO and CPO need none either.
    for name, run in NEW_RUNS.items():
        edit_config(workdir, "runs", name, {**run, "max_steps": 3, "logging_steps": 1})
    result = snakemake(workdir, "-n", "--cores", "1", "sweep", "results/report.html")
    assert planned_jobs(result.stdout) == {"reference": 1, "align_run": 4, "evaluate_run": 4, "sweep": 1,
                                           "report": 1}
    assert "results/reference/preferences/unpaired-max64.parquet" in result.stdout

    targets = [f"results/runs/{name}/eval.json" for name in TRAINED]
    result = snakemake(workdir, "--cores", "2", *targets)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in TRAINED:
        run = NEW_RUNS[name]
        model_dir = workdir / "results/runs" / name / "model"
        assert AutoModelForCausalLM.from_pretrained(model_dir).config.model_type == "llama"
        lineage = json.loads((model_dir / "lineage.json").read_text())
        assert lineage["config"]["method"] == run["method"]
        metrics = (model_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in metrics if '"loss"' in line] == [1, 2, 3]  # a few steps each
        log = (workdir / "logs/align" / f"{name}.log").read_text()
        assert "Epoch 1/1: [" in log
        evaluation = json.loads((workdir / "results/runs" / name / "eval.json").read_text())
        assert evaluation["pairs"] == json.loads((workdir / "results/eval/aligned.json").read_text())["pairs"]
    assert "Reference log-probs: results/reference/preferences/unpaired-max64.parquet" in \
        (workdir / "logs/align/kto.log").read_text()
    assert sorted(p.name for p in (workdir / "results/reference/preferences").glob("*.parquet")) == \
        ["pairs-max64.parquet", "unpaired-max64.parquet"]
    # The report of the sweep so far: the trained runs beside the demo's own (SimPO and CPO not run yet).
    config = yaml.safe_load((workdir / "config/config.yaml").read_text())
    config["runs"] = {name: run for name, run in config["runs"].items() if name not in NEW_RUNS or name in TRAINED}
    (workdir / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = snakemake(workdir, "--cores", "1", "results/report.html")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    page = (workdir / "results/report.html").read_text()
    for name, method in {**{n: NEW_RUNS[n]["method"] for n in TRAINED}, "gdpo-k4": "gdpo", "aligned": "dpo"}.items():
        assert f"<tr><td>{name}</td><td>{method}</td>" in page
