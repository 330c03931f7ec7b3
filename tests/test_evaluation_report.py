"""What a user reads after alignment: the validation report's length bias, lm-eval's benchmarks (the demo's local
task, offline), the report's tables and panels, and which jobs a change of the evaluate section reruns."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from lexalign.core.errors import LexAlignError
from workflow import copy_workflow, edit_config, planned_jobs, snakemake

# --- the validation report: is the longer answer the preferred one? ---------------------------------


def test_validation_reports_how_often_the_chosen_answer_is_the_longer_one(tmp_path):
    from lexalign.config.sections import DatasetConfig
    from lexalign.data.validated import summary
    from lexalign.data.validation import validate_preferences

    rows = [{"prompt": f"q{i}", "chosen": "x" * c, "rejected": "y" * r}
            for i, (c, r) in enumerate([(5, 1), (4, 2), (3, 3), (1, 2)])]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = validate_preferences(DatasetConfig.from_dict({"path": str(data), "eval_fraction": 0.0}), None)["report"]
    bias = report["length_bias"]
    assert bias["pairs"] == 4 and bias["unit"] == "characters"
    assert bias["chosen_longer_share"] == 0.5 and bias["equal_length_share"] == 0.25
    # d = (4, 2, 0, -1): each pair in both orders, (d, 1) and (-d, 0); their Pearson correlation by hand.
    import numpy as np

    d = np.array([4.0, 2.0, 0.0, -1.0])
    by_hand = np.corrcoef(np.concatenate([d, -d]), np.concatenate([np.ones(4), np.zeros(4)]))[0, 1]
    assert bias["correlation"] == pytest.approx(by_hand)
    assert "chosen is the longer answer in 50.0% of pairs" in summary(report)


# --- lm-eval: the demo's local task -----------------------------------------------------------------


def test_the_demo_task_data_are_the_held_out_prompts():
    from lexalign.demo import benchmark, task

    shipped = [json.loads(line) for line in benchmark.DATA.read_text().splitlines()]
    assert shipped == benchmark.rows()
    assert {row["prompt"] for row in shipped} == {prompt for _, prompt in task.HELD_OUT_PROMPTS}
    assert all(task.judge(row["choices"][row["gold"]]) and not task.judge(row["choices"][1 - row["gold"]])
               for row in shipped)


def test_an_unknown_task_is_named_before_any_model_loads(tmp_path):
    from lexalign.steps import results

    output = tmp_path / "lm_eval.json"
    with pytest.raises(LexAlignError, match="evaluate.lm_eval.tasks") as err:
        results.lm_eval(model=tmp_path / "no-model-needed", output=output, device="cpu",
                       lm_eval={"tasks": ["lexalign_demo_polite", "hellaswagg"]})
    assert 'lm-eval knows no task "hellaswagg"' in err.value.message
    assert "hellaswag" in err.value.render()  # the close match
    assert not output.exists()


# --- the report -------------------------------------------------------------------------------------


def _run_dir(root, name, loss, points):
    folder = root / name
    folder.mkdir()
    (folder / "lineage.json").write_text(json.dumps({"config": loss}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in points))
    return folder


def test_losses_of_different_methods_get_panels_of_their_own(tmp_path):
    from PIL import Image

    from lexalign.evaluation.plots import loss_kind, plot_curves

    runs = {"sigmoid": _run_dir(tmp_path, "a", {"method": "dpo", "loss_type": ["sigmoid"]}, [(1, 0.69), (2, 0.6)]),
            "ipo": _run_dir(tmp_path, "b", {"method": "dpo", "loss_type": ["ipo"]}, [(5, 25.0)]),
            "gdpo": _run_dir(tmp_path, "c", {"method": "gdpo", "loss_type": ["sigmoid"]}, [(1, 1.2), (2, 1.0)]),
            "sigmoid2": _run_dir(tmp_path, "d", {"method": "dpo", "loss_type": "sigmoid"}, [(1, 0.7)])}
    assert [loss_kind(runs[n]) for n in runs] == ["DPO: sigmoid", "DPO: ipo", "GDPO", "DPO: sigmoid"]
    out = tmp_path / "plots"
    out.mkdir()
    loss, margins, _ = plot_curves(runs, out)
    # Three losses, three panels side by side (never one axis); the margins (none logged) one panel.
    assert Image.open(loss).size[0] > 2 * Image.open(margins).size[0]


@pytest.mark.slow
def test_the_demo_report_shows_samples_lengths_judge_and_benchmarks(demo_run):
    evaluation = json.loads((demo_run / "results/eval/aligned.json").read_text())
    assert len(evaluation["samples"]) == 16
    assert evaluation["length"]["n"] == 40 and evaluation["length"]["ratio"] > 0
    judge = evaluation["judge"]
    assert judge["name"] == "demo-polite-greeting" and judge["n"] == 40
    assert judge["win_rate"] >= 0.8 and judge["ci_low"] <= judge["win_rate"] <= judge["ci_high"]
    benchmark = json.loads((demo_run / "results/eval/aligned.lm_eval.json").read_text())
    polite = benchmark["lm_eval"]["lexalign_demo_polite"]["acc"]
    assert polite["aligned"] - polite["sft"] >= 0.3  # the aligned model finds the polite answer more likely
    sweep = json.loads((demo_run / "results/runs/gdpo-k4/lm_eval.json").read_text())
    assert sweep["lm_eval"]["lexalign_demo_polite"]["acc"]["sft"] == polite["sft"]  # one SFT evaluation, shared
    validation = json.loads((demo_run / "results/data/preferences/report.json").read_text())
    assert validation["length_bias"]["pairs"] == validation["train_rows"] + validation["eval_rows"]
    page = (demo_run / "results/report.html").read_text()
    for heading in ("Judge: aligned against SFT", "Answer length", "Benchmarks (lm-evaluation-harness)",
                    "Answers side by side", "chosen answer is the longer one"):
        assert heading in page, heading
    assert page.count("<details") == 2 and "lexalign_demo_polite" in page
    assert re.search(r"\d+\.\d% – \d+\.\d%", page)  # the judge's interval
    assert "&lt;" not in evaluation["samples"][0]["prompt"]  # texts are escaped in the page, not in the json


# --- what a change of the evaluate section reruns ----------------------------------------------------


def _copy(demo_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(demo_run, workdir, symlinks=True)
    return workdir


TRAINING = {"download_model", "download_data", "prepare_sft_data", "finetune", "validate_preferences",
            "validate_groups", "reference", "align", "align_run"}


@pytest.mark.slow
def test_changing_the_evaluate_section_reruns_evaluation_and_the_report_never_training(demo_run, tmp_path):
    workdir = _copy(demo_run, tmp_path)
    edit_config(workdir, "evaluate", "num_samples", 8)
    result = snakemake(workdir, "-n", "--cores", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert planned_jobs(result.stdout) == {"evaluate": 1, "evaluate_run": 1, "report": 1, "all": 1}
    edit_config(workdir, "evaluate", "num_samples", 16)
    edit_config(workdir, "evaluate", "lm_eval", {"tasks": ["lexalign_demo_polite"], "limit": 10})
    result = snakemake(workdir, "-n", "--cores", "1")
    # Only the benchmarks (the SFT model's once) and the report: no evaluation, no training.
    assert planned_jobs(result.stdout) == {"lm_eval_sft": 1, "lm_eval": 1, "lm_eval_run": 1, "report": 1, "all": 1}


@pytest.mark.slow
def test_a_reward_model_judge_plans_its_download_and_the_evaluations(demo_run, tmp_path, demo_model_dir):
    workdir = _copy(demo_run, tmp_path)
    edit_config(workdir, "evaluate", "judge", "reward_model")
    edit_config(workdir, "evaluate", "reward_model", {"path": str(demo_model_dir)})
    result = snakemake(workdir, "-n", "--cores", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = planned_jobs(result.stdout)
    assert jobs == {"download_reward_model": 1, "evaluate": 1, "evaluate_run": 1, "report": 1, "all": 1}
    assert not TRAINING & set(jobs)


def test_a_judge_without_its_model_stops_the_plan(tmp_path):
    workdir = copy_workflow(tmp_path)
    edit_config(workdir, "evaluate", "judge", "reward_model")
    result = snakemake(workdir, "-n", "--cores", "1")
    assert result.returncode != 0
    assert "evaluate.reward_model names no model" in result.stdout + result.stderr
    edit_config(workdir, "evaluate", "reward_model", {"path": str(tmp_path / "no-such-model")})
    result = snakemake(workdir, "-n", "--cores", "1")
    assert result.returncode != 0 and "evaluate.reward_model.path" in result.stdout + result.stderr
