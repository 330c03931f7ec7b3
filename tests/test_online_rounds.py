"""The online rounds in the workflow (rules/online.smk): what is planned, and one real run on the demo."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from workflow import REPO, copy_workflow, planned_jobs, snakemake

EXAMPLE = yaml.safe_load((REPO / "config" / "examples" / "online.yaml").read_text())
ROUND_RULES = ("online_generate", "online_score", "online_select", "online_validate", "online_reference",
               "online_align")


def _config(workdir, **changes):
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _plan(workdir, *targets):
    result = snakemake(workdir, "-n", *targets)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return planned_jobs(result.stdout) if "Job stats:" in result.stdout else {}  # nothing to be done


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("online-plan"))


def test_without_online_the_plan_is_unchanged(workdir):
    plain = _plan(workdir)
    assert not any(rule.startswith("online") for rule in plain)
    _config(workdir, online=None)
    (workdir / "config" / "config.yaml").write_text((workdir / "config" / "config.yaml").read_text()
                                                     + "online:\n")  # an empty section: YAML null
    assert _plan(workdir) == plain
    _config(workdir, online={"rounds": 2, "prompts": {"from": "demo"}, "judge": "demo",
                             "sampling": {"max_new_tokens": 16}})
    online = _plan(workdir)
    assert {rule: online[rule] for rule in ROUND_RULES} == dict.fromkeys(ROUND_RULES, 2)
    assert online["online_final"] == online["online_prompts"] == 1
    assert {rule: n for rule, n in online.items() if not rule.startswith("online")} == plain
    _config(workdir, online=None)


def test_invalid_online_sections_are_clear_errors(workdir):
    for section, message in [({"prompts": {"from": "demo"}}, "rounds"),
                             ({"rounds": 1, "judge": "demo", "select": "ranked", "sampling": {"max_new_tokens": 16}},
                              "group_delay_size"),
                             ({"rounds": 1, "judge": "demo", "sampling": {"max_new_tokens": 64}}, "max_length")]:
        _config(workdir, online=section)
        result = snakemake(workdir, "-n")
        assert result.returncode != 0 and message in result.stdout + result.stderr, section
        assert "Traceback" not in result.stdout + result.stderr
    _config(workdir, online=None)


def _jobs(output: str) -> list[dict]:
    """The jobs of a dry run's output: rule, and each `key: value` line of its block (input, wildcards, ...)."""
    jobs = []
    for line in output.splitlines():
        if line.startswith(("rule ", "localrule ")):
            jobs.append({"rule": line.split()[1].rstrip(":")})
        elif jobs and line.startswith("    ") and ": " in line:
            key, value = line.strip().split(": ", 1)
            jobs[-1][key] = value
    return jobs


def _planned_reference_model(workdir, round_number: int) -> str:
    result = snakemake(workdir, "-n", "results/online/final")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = [job for job in _jobs(result.stdout) if job["rule"] == "online_reference"
            and job.get("wildcards", "").startswith(f"r={round_number},")]
    assert len(jobs) == 1, result.stdout[-3000:]
    models = [path for path in jobs[0]["input"].split(", ") if path.startswith("results/")
              and ("/models/" in path or path.endswith("/model"))]
    assert len(models) == 1, jobs[0]["input"]
    return models[0]


def test_the_reference_of_a_round_is_the_sft_model_or_the_previous_rounds(workdir):
    online = {"rounds": 2, "prompts": {"from": "demo"}, "judge": "demo", "sampling": {"max_new_tokens": 16}}
    _config(workdir, online={**online, "reference": "sft"})
    assert _planned_reference_model(workdir, 2) == "results/models/sft"
    assert _planned_reference_model(workdir, 1) == "results/models/sft"
    _config(workdir, online={**online, "reference": "previous"})
    assert _planned_reference_model(workdir, 2) == "results/online/round-1/model"
    assert _planned_reference_model(workdir, 1) == "results/models/sft"
    _config(workdir, online=None)


def test_per_round_alignment_settings_are_checked_by_round(workdir):
    online = {"rounds": 3, "prompts": {"from": "demo"}, "judge": "demo", "sampling": {"max_new_tokens": 16}}
    for alignment, said in [([{"beta": 0.1}, {"beta": -1}], ['"online.alignment[1].beta"', "round 2 and every "
                                                            "later round"]),
                            ([{}, {"betta": 0.2}, {}], ['"online.alignment[1].betta"', "online.alignment[1] (round 2)",
                                                        'Did you mean "beta"?']),
                            ({"learning_rate": 0}, ['"online.alignment.learning_rate"', "every round"]),
                            ([{}, {"method": "gdpo", "group_delay_size": 4}], ["online.alignment[1] (round 2 and "
                                                                               "every later round)", "best_worst"])]:
        _config(workdir, online={**online, "alignment": alignment})
        result = snakemake(workdir, "-n")
        assert result.returncode != 0, alignment
        assert all(text in result.stdout + result.stderr for text in said), (said, result.stderr[-2000:])
        assert "Traceback" not in result.stdout + result.stderr
    _config(workdir, online=None)


@pytest.fixture(scope="module")
def demo_rounds(tmp_path_factory, demo_run):
    """The example (2 rounds), from the demo's prompts alone (no preference pair is read), on the SFT model of
    the shared demo run (the session's fixture: no SFT job here; the short fixture SFT model is never polite, so
    no pair)."""
    root = tmp_path_factory.mktemp("online-demo")
    workdir = copy_workflow(root / "wf")
    # A copy: the shared run's own folder must not change (its later tests expect a run with nothing to do).
    sft = shutil.copytree(demo_run / "results" / "models" / "sft", root / "sft")
    _config(workdir, **{**EXAMPLE, "model": {"source": "local", "path": str(sft)},
                        "finetune": {"method": "none"}, "online": DEMO_ONLINE})
    result = snakemake(workdir, "--cores", "2", "results/online/final", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "download_data" not in result.stdout + result.stderr  # prompts alone: no preference data fetched
    return workdir


DEMO_ONLINE = {**EXAMPLE["online"], "rounds": 2}


@pytest.mark.slow
def test_the_demo_rounds_end_to_end(demo_rounds):
    """Each round's outputs and counts, the trained ids are the sampled ids, the lineage names every round, a
    rerun plans nothing; raising rounds plans only round 3, another judge replans scores and after, not the
    generations."""
    workdir, online = demo_rounds, DEMO_ONLINE
    prompts, k = online["prompts"]["per_round"], online["samples_per_prompt"]
    results = workdir / "results" / "online"
    for r in (1, 2):
        folder = results / f"round-{r}"
        generations = pq.read_table(folder / "generations" / "generations.parquet").to_pylist()
        assert len(generations) == prompts and all(len(g["completion_ids"]) == k for g in generations)
        counts = json.loads((folder / "selection.json").read_text())
        assert counts["prompts"] == prompts and counts["completions"] == prompts * k
        assert counts["skipped_too_long"] == 0
        assert counts["selected"] + counts["ties"] + counts["too_few"] == prompts
        assert counts["truncated_dropped"] == 0  # truncated: keep
        speed = workdir / "results" / "benchmarks" / "online" / f"round-{r}" / "generation.json"
        speed = json.loads(speed.read_text())
        assert speed["round"] == r and speed["tokens_per_second"] > 0 and speed["completions"] == prompts * k
        # Exactly the tokens sampled are the tokens trained: the reference file (what align reads) holds them.
        selection = [json.loads(line) for line in (folder / "selection.jsonl").read_text().splitlines()]
        reference = pq.read_table(next((workdir / "results" / "reference" / f"online-round-{r}").glob("*.parquet")))
        sampled = {tuple(s["prompt_ids"]): [s["chosen_ids"], s["rejected_ids"]] for s in selection}
        trained = reference.to_pylist()
        train = pd.read_parquet(folder / "preferences" / "train.parquet")
        assert 0 < len(trained) == len(train) <= counts["selected"]  # eval_fraction 0: every row trains
        assert all(row["completion_ids"] == sampled[tuple(row["prompt_ids"])] for row in trained)
        sampled_ids = {tuple(ids) for g in generations for ids in g["completion_ids"]}
        assert all(tuple(ids) in sampled_ids for row in trained for ids in row["completion_ids"])
        assert (folder / "model" / "config.json").is_file()
    lineage = json.loads((results / "final" / "lineage.json").read_text())
    assert [h["round"] for h in lineage["rounds"]] == [1, 2]
    assert lineage["rounds"][1]["policy"].endswith("round-1/model")  # round 2 sampled from round 1's model
    assert lineage["rounds"][0]["policy"].endswith("models/base")
    assert all(h["evaluation"]["win_rate"] is not None for h in lineage["rounds"])
    # The SFT model's held-out answers are decoded by round 1's evaluation and read back by round 2's: the same
    # answers, and round 2's log says where they came from.
    evaluations = [json.loads((results / f"round-{r}" / "eval.json").read_text()) for r in (1, 2)]
    assert [s["sft"] for s in evaluations[0]["samples"]] == [s["sft"] for s in evaluations[1]["samples"]]
    assert evaluations[0]["judge"]["mean_reward_sft"] == evaluations[1]["judge"]["mean_reward_sft"]
    logs = [(workdir / "logs" / "online" / f"round-{r}" / "evaluate.log").read_text() for r in (1, 2)]
    assert "from the cache" not in logs[0] and "The SFT model's answers to the" in logs[1]
    assert len(list((workdir / "results" / "cache" / "answers").glob("*.json"))) == 1  # held-out only: no plain
    polite = [h["selection"]["mean_score"] for h in lineage["rounds"]]
    print("judged polite rate of each round's samples:", polite)
    # Alignment works from prompts alone: round 1's model samples polite answers far more often than SFT did
    # (4.2% → 62.7% on this machine; BENCHMARKS.md, "Online rounds on the demo").
    assert polite[1] >= polite[0] + 0.25, polite


@pytest.mark.slow
def test_the_report_shows_each_round_as_its_files_say(demo_rounds, demo_run, tmp_path):
    """The report of the demo run with the rounds' folders: a per-round section whose figures are the round files'
    (selection.json, generations/report.json, eval.json), and its plot."""
    import re

    from lexalign.evaluation.report import build_report

    results = demo_run / "results"
    rounds = [demo_rounds / "results" / "online" / f"round-{r}" for r in (1, 2)]
    page = build_report({"aligned": results / "eval" / "aligned.json",
                         "gdpo-k4": results / "runs" / "gdpo-k4" / "eval.json"},
                        {"aligned": results / "aligned", "gdpo-k4": results / "runs" / "gdpo-k4" / "model"},
                        results / "data" / "preferences", results / "models" / "base", tmp_path / "report.html",
                        tmp_path / "report", online=rounds)
    text = page.read_text()
    assert "<h2>Online rounds</h2>" in text and 'src="report/online_rounds.png"' in text
    assert (tmp_path / "report" / "online_rounds.png").stat().st_size > 10_000
    table = text.split('<table class="online">', 1)[1].split("</table>", 1)[0]
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in table.split("<tr>")[2:]]
    assert len(rows) == 2
    for row, folder in zip(rows, rounds, strict=True):
        selection = json.loads((folder / "selection.json").read_text())
        generated = json.loads((folder / "generations" / "report.json").read_text())
        evaluation = json.loads((folder / "eval.json").read_text())
        judge = evaluation["judge"]
        assert row[0] == folder.name.split("-")[1]
        assert row[1] == str(generated["completions"])
        assert row[2] == f"{selection['selected']} / {selection['ties']}"
        assert row[3] == f"{selection['mean_score']:.3f}"
        assert row[4] == f"{generated['mean_completion_tokens']:.1f}"
        assert row[5] == f"{judge['mean_reward_aligned']:.3f}"
        assert row[6] == f"{100 * judge['win_rate']:.1f}%"
        assert row[7] == f"{100 * judge['ci_low']:.1f}% – {100 * judge['ci_high']:.1f}%"
        assert row[8] == f"{evaluation['length']['aligned_mean_tokens']:.1f}"
        assert row[9] == f"{evaluation['kl_to_reference']:.3f}"
        assert row[10] == ("start" if folder.name == "round-1" else "round 1")  # reference: previous (finetune none)


@pytest.mark.slow
def test_the_demo_rounds_replan_as_the_issue_says(demo_rounds, tmp_path):
    """A rerun plans nothing; raising rounds plans only round 3; another judge replans scores and after, not the
    generations."""
    workdir = shutil.copytree(demo_rounds, tmp_path / "wf", symlinks=True)
    online = DEMO_ONLINE
    assert _plan(workdir, "results/online/final") == {}
    _config(workdir, online={**online, "rounds": 3})
    assert _plan(workdir, "results/online/final") == {**dict.fromkeys(ROUND_RULES, 1), "online_evaluate": 1,
                                                      "online_final": 1}
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    config["evaluate"]["llm_judge"] = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
    _config(workdir, online={**online, "judge": "llm"}, evaluate=config["evaluate"])
    replanned = _plan(workdir, "results/online/final")
    # Round 1's generations stay; round 2's are replanned only because round 1's model will change.
    assert replanned.get("online_generate") == 1 and "online_prompts" not in replanned
    assert replanned["online_score"] == 2 and replanned["online_align"] == 2


# --- prompts held out of the rounds, for their evaluation ------------------------------------------------------


def test_a_prompt_file_sets_prompts_aside_that_no_round_samples(tmp_path):
    from lexalign.core.errors import LexAlignError
    from lexalign.generation.prompts import held_out_prompts, round_prompts
    from lexalign.steps.rounds import online_prompts

    source = tmp_path / "prompts.jsonl"
    texts = [f"Question {i}?" for i in range(23)] + ["Question 0?"]  # one duplicate
    source.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in texts))
    section = {"from": "path", "path": str(source), "prompt_field": "instruction", "held_out": None}
    out = tmp_path / "out.json"
    # A tenth of 23 distinct prompts held out.
    assert online_prompts(output=out, prompts=section, seed=3) == {"prompts": 21, "held_out": 2}
    written = json.loads(out.read_text())
    held, sampled = written["held_out"], written["prompts"]
    assert set(held).isdisjoint(sampled) and set(held) | set(sampled) == set(texts)
    every_round = {p for number in range(1, 8) for p in round_prompts(written, number, per_round=5)}
    assert every_round == set(sampled)  # seven rounds of 5 cycle through the 21, never into the 2
    assert held_out_prompts({"from": "path"}, out, None, seed=3, count=64) == (held, False, True)

    # held_out 0: nothing set aside, and the evaluation says its prompts may have been trained on.
    online_prompts(output=out, prompts={**section, "held_out": 0}, seed=3)
    assert held_out_prompts({"from": "path"}, out, None, seed=3, count=4)[2] is False
    with pytest.raises(LexAlignError, match="online.prompts.held_out is 23") as err:
        online_prompts(output=out, prompts={**section, "held_out": 23}, seed=3)
    assert "Lower online.prompts.held_out" in err.value.render()


def test_preference_data_with_an_eval_split_sets_nothing_aside(tmp_path):
    from lexalign.steps.rounds import online_prompts

    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({"prompt": ["a", "b", "c"]}).to_parquet(data / "train.parquet")
    (data / "report.json").write_text("{}")
    section = {"from": "preference_data", "path": None, "prompt_field": "prompt", "held_out": None}
    pd.DataFrame({"prompt": ["z"]}).to_parquet(data / "eval.parquet")
    written = online_prompts(output=tmp_path / "a.json", prompts=section, seed=0, data=data)
    assert written == {"prompts": 3, "held_out": 0}
    pd.DataFrame({"prompt": pd.Series([], dtype=str)}).to_parquet(data / "eval.parquet")  # no eval split
    written = online_prompts(output=tmp_path / "b.json", prompts=section, seed=0, data=data)
    assert written == {"prompts": 2, "held_out": 1}


def test_cached_answers_are_keyed_by_what_they_depend_on(tmp_path, zoo_models):
    """The evaluate step's cache of the SFT model's answers: a second call with the same inputs reads them back; a
    change of the prompts, the decoding, the device or the weights decodes again; a damaged file is decoded again."""
    from lexalign.evaluation.answers import cached_answers

    model, other = zoo_models("llama3"), zoo_models("gemma")
    calls = []

    def answer(prompts):
        calls.append(list(prompts))
        return [{"text": f"answer to {p}", "tokens": 3, "capped": False} for p in prompts]

    decoding = {"max_new_tokens": 8, "batch_size": 2, "chat": True}
    first, hit = cached_answers(tmp_path, model, model, "cpu", ["a", "b"], decoding, answer)
    assert not hit and len(calls) == 1
    again, hit = cached_answers(tmp_path, model, model, "cpu", ["a", "b"], decoding, answer)
    assert hit and again == first and len(calls) == 1
    for changed in ((model, "cpu", ["a", "c"], decoding), (model, "cpu", ["a", "b"], {**decoding, "batch_size": 4}),
                    (model, "cuda", ["a", "b"], decoding), (other, "cpu", ["a", "b"], decoding)):
        weights, device, prompts, settings = changed
        _, hit = cached_answers(tmp_path, weights, model, device, prompts, settings, answer)
        assert not hit
    assert len(calls) == 5
    for file in tmp_path.glob("*.json"):
        file.write_text("{not json")
    _, hit = cached_answers(tmp_path, model, model, "cpu", ["a", "b"], decoding, answer)
    assert not hit and len(calls) == 6
    assert cached_answers(None, model, model, "cpu", ["a"], decoding, answer)[1] is False and len(calls) == 7
    assert cached_answers(tmp_path, model, model, "cpu", [], decoding, answer) == ([], False) and len(calls) == 7
