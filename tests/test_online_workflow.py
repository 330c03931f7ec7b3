"""The online rounds run by Snakemake on the random-weight demo model: per-round settings, every pair method, a
generation job killed mid-way and resumed.

One real 2-round run per module (`rounds_run`), judged by an LLM judge on a loopback endpoint that rates each answer
by a hash of its text (so the random model's samples are never all tied, unlike the demo's politeness rule); each
test works on a copy of it (results and Snakemake's records), so none changes what another reads."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest
import yaml
from loopback import ChatServer

from workflow import SNAKEMAKE, copy_workflow, planned_jobs, snakemake

ROUND = ("online_generate", "online_score", "online_select", "online_validate", "online_reference", "online_align")
STEP = {"learning_rate": 1e-2, "batch_size": 2, "gradient_accumulation_steps": 1, "num_epochs": 1,
        "warmup_steps": 0, "save_steps": 1000, "logging_steps": 1}
ONLINE = {"rounds": 2, "prompts": {"from": "demo", "per_round": 4}, "samples_per_prompt": 3,
          "sampling": {"max_new_tokens": 6, "batch_size": 4, "shard_prompts": 2}, "judge": "llm",
          "truncated": "keep", "alignment": [dict(STEP), dict(STEP)]}
ANSWER = re.compile(r"\[The start of the answer\]\n(.*?)\n\[The end of the answer\]", re.S)


class HashRatingServer(ChatServer):
    """Rates an answer 1-10 by a hash of its text: the same text always gets the same rating, two texts rarely
    tie. Asked to compare two answers (each round's evaluation against SFT), calls it a tie."""

    def reply(self, body: dict, number: int) -> str:
        found = ANSWER.search(body["messages"][-1]["content"])
        if found is None:
            return "[[C]]"
        return f"[[{int(hashlib.sha256(found.group(1).encode()).hexdigest(), 16) % 10 + 1}]]"


def _edit(workdir, online=None, **sections):
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    if online is not None:
        config["online"] = online
    config.update(sections)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _plan(workdir, target="results/online/final"):
    result = snakemake(workdir, "-n", target)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return planned_jobs(result.stdout) if "Job stats:" in result.stdout else {}


def _run(workdir, target="results/online/final"):
    result = snakemake(workdir, "--cores", "2", target, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(next(model_dir.glob("*.safetensors"))))


def _changed(before, after) -> bool:
    import torch

    return any(not torch.equal(before[name], after[name]) for name in before)


@pytest.fixture(scope="module")
def judge():
    with HashRatingServer(limit=100000) as server:
        yield server


@pytest.fixture(scope="module")
def rounds_run(tmp_path_factory, judge):
    """Two DPO rounds from the random demo model (finetune: none), 4 prompts x 3 samples a round."""
    workdir = copy_workflow(tmp_path_factory.mktemp("online-run"))
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    # Each round's evaluation against SFT (for the report) asks the same judge: a few prompts, short answers.
    evaluate = {**config["evaluate"], "llm_judge": {"base_url": judge.url, "model": "hash-judge"},
                "num_prompts": 4, "num_samples": 2, "max_new_tokens": 6}
    _edit(workdir, online=ONLINE, finetune={"method": "none"}, evaluate=evaluate)
    _run(workdir)
    return workdir


def _copy(rounds_run, tmp_path):
    """The run with its Snakemake records, so a plan in the copy is the plan in the run."""
    return shutil.copytree(rounds_run, tmp_path / "wf", symlinks=True)


def test_one_rounds_settings_replan_that_round_and_what_follows(rounds_run, tmp_path):
    workdir = _copy(rounds_run, tmp_path)
    assert _plan(workdir) == {}
    _edit(workdir, online={**ONLINE, "alignment": [dict(STEP), {**STEP, "learning_rate": 5e-3}]})
    assert _plan(workdir) == {"online_align": 1, "online_evaluate": 1, "online_final": 1}
    _edit(workdir, online={**ONLINE, "alignment": [{**STEP, "beta": 0.2}, dict(STEP)]})
    # Round 1's model changes, so round 2 samples again: every job of round 2, and round 1's align alone.
    assert _plan(workdir) == {**dict.fromkeys(ROUND, 1), "online_align": 2, "online_evaluate": 2,
                              "online_final": 1}
    # One mapping is every round's: the same settings as the list of two equal ones, nothing to do.
    _edit(workdir, online={**ONLINE, "alignment": dict(STEP)})
    assert _plan(workdir) == {}


def _sampled(folder) -> dict:
    """prompt ids → the (best, worst) sampled ids of the round's selection."""
    selection = [json.loads(line) for line in (folder / "selection.jsonl").read_text().splitlines()]
    return {tuple(s["prompt_ids"]): [s["chosen_ids"], s["rejected_ids"]] for s in selection}


@pytest.mark.parametrize("method", ["simpo", "orpo", "cpo"])
def test_a_reference_free_round_trains_on_the_sampled_ids(rounds_run, tmp_path, method):
    """ORPO, SimPO and CPO: no reference job; the round trains, on exactly the ids sampled."""
    workdir = _copy(rounds_run, tmp_path)
    _edit(workdir, online={**ONLINE, "alignment": [dict(STEP), {**STEP, "method": method}]})
    assert _plan(workdir) == {"online_align": 1, "online_evaluate": 1, "online_final": 1}  # no online_reference
    if method != "simpo":
        return  # one of the family trains (the same trainer); the others' plans are checked
    _run(workdir)
    folder = workdir / "results" / "online" / "round-2"
    assert _changed(_weights(workdir / "results" / "online" / "round-1" / "model"), _weights(folder / "model"))
    lineage = json.loads((folder / "model" / "lineage.json").read_text())
    assert lineage["config"]["method"] == "simpo"
    assert "Tokens: the ids sampled in the online round" in (workdir / "logs" / "online" / "round-2" /
                                                              "align.log").read_text()
    # What the align step builds from the rule's inputs is what its trainer reads: the sampled ids.
    from lexalign.config.loader import section_defaults
    from lexalign.config.sections import AlignConfig
    from lexalign.data.validated import read_validated
    from lexalign.models.loading import load_tokenizer
    from lexalign.train.align import AlignJob, tokenized_datasets
    from lexalign.train.trainer_data import read_selection

    train, evals = read_validated(folder / "preferences")
    job = AlignJob(model_path=folder / "model", train=train, eval=evals, output_dir=tmp_path / "unused",
                   checkpoint_dir=tmp_path / "unused-checkpoints",
                   cfg=AlignConfig.from_dict(section_defaults("alignment", {"method": "simpo", "max_length": 64})),
                   sampled=read_selection(folder / "selection.jsonl"))
    dataset, _ = tokenized_datasets(job, load_tokenizer(folder / "model"))
    sampled = _sampled(folder)
    assert len(dataset) == len(train) > 0
    assert all([row["chosen_ids"], row["rejected_ids"]] == sampled[tuple(row["prompt_ids"])] for row in dataset)


def test_a_kto_round_trains_the_best_as_desirable_and_the_worst_as_not(rounds_run, tmp_path):
    workdir = _copy(rounds_run, tmp_path)
    _edit(workdir, online={**ONLINE, "alignment": [dict(STEP), {**STEP, "method": "kto"}]})
    assert _plan(workdir) == {"online_reference": 1, "online_align": 1, "online_evaluate": 1, "online_final": 1}
    _run(workdir)
    folder = workdir / "results" / "online" / "round-2"
    assert _changed(_weights(workdir / "results" / "online" / "round-1" / "model"), _weights(folder / "model"))
    reference = pq.read_table(workdir / "results" / "reference" / "online-round-2" / "unpaired-max64.parquet")
    sampled = _sampled(folder)
    rows = reference.to_pylist()
    assert len(rows) == 2 * len(sampled)  # each pair split in two rows
    for row in rows:  # the completion is the best (label 1) or the worst (label 0) of its prompt, as sampled
        best, worst = sampled[tuple(row["prompt_ids"])]
        assert row["completion_ids"][0] == (best if row["scores"][0] == 1.0 else worst)
        # The KL term's completion is another row's, as sampled too.
        assert any(row["completion_ids"][1] in pair for pair in sampled.values())


def test_a_generation_killed_mid_way_resumes_from_its_shards(rounds_run, tmp_path):
    """Snakemake stopped while round 1 samples (some shards written): the rerun samples only the missing shards,
    and the generations equal an uninterrupted run's."""
    workdir = _copy(rounds_run, tmp_path)
    sampling = {"max_new_tokens": 32, "batch_size": 1, "shard_prompts": 1, "seed": 7}
    online = {**ONLINE, "prompts": {"from": "demo", "per_round": 8}, "sampling": sampling}
    _edit(workdir, online=online)
    target = "results/online/round-1/generations"
    shards = workdir / "results" / "online" / "round-1" / ".generations-work" / "shards"
    process = subprocess.Popen([SNAKEMAKE, "--cores", "1", target], cwd=workdir, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, done = time.monotonic() + 120, []
    while time.monotonic() < deadline and process.poll() is None:
        done = sorted(shards.glob("shard-*.parquet")) if shards.is_dir() else []
        if done:
            break
        time.sleep(0.05)
    assert done and process.poll() is None, "the generate job finished or never wrote a shard"
    os.killpg(process.pid, signal.SIGTERM)  # Snakemake and its job, as a scheduler's time limit stops them
    process.wait(timeout=60)
    kept = sorted(p.name for p in shards.glob("shard-*.parquet"))
    assert 0 < len(kept) < 8, kept
    _run(workdir, target)
    report = json.loads((workdir / target / "report.json").read_text())
    assert report["shards"] == 8 and report["shards_generated"] == 8 - len(kept)
    # An uninterrupted run of the same step with the rule's arguments.
    from lexalign.config.loader import validate_config
    from lexalign.config.online import round_sampling, settings
    from lexalign.steps import rounds

    resolved = settings(validate_config(yaml.safe_load((workdir / "config" / "config.yaml").read_text()), "pipeline"))
    whole = tmp_path / "whole" / "generations"
    rounds.online_generate(model=workdir / "results" / "models" / "base", output=whole, number=1, device="cpu",
                           prompts=workdir / "results" / "online" / "prompts.json",
                           sampling=round_sampling(resolved, 1))
    resumed = pq.read_table(workdir / target / "generations.parquet")
    uninterrupted = pq.read_table(whole / "generations.parquet")
    columns = ["row", "prompt_ids", "completion_ids", "completions", "truncated"]
    assert resumed.select(columns).to_pylist() == uninterrupted.select(columns).to_pylist()
    assert f"{8 - len(kept)} of 8 shards sampled now" in (workdir / "logs" / "online" / "round-1" /
                                                          "generate.log").read_text()


def test_a_reward_functions_file_is_a_code_input_of_scoring_not_of_sampling(rounds_run, tmp_path):
    """online.judge {python: file:function}: round 1 scored by the user's function from the samples already drawn;
    editing the file rescores and reselects, and never samples again."""
    workdir = _copy(rounds_run, tmp_path)
    (workdir / "rewards.py").write_text("def shorter(prompts, completions, **kwargs):\n"
                                        "    return [-float(len(c)) for c in completions]\n")
    _edit(workdir, online={**ONLINE, "judge": {"python": "rewards.py:shorter"}})
    target = "results/online/round-1/selection.json"
    assert _plan(workdir, target) == {"online_score": 1, "online_select": 1}
    _run(workdir, target)
    generations = pq.read_table(workdir / "results" / "online" / "round-1" / "generations" / "generations.parquet")
    scores = pq.read_table(workdir / "results" / "online" / "round-1" / "scores-python.parquet").to_pylist()
    by_row = {r["row"]: r["completions"] for r in generations.to_pylist()}
    assert [r["scores"] for r in scores] == [[-float(len(c)) for c in by_row[r["row"]]] for r in scores]
    (workdir / "rewards.py").write_text("def shorter(prompts, completions, **kwargs):\n"
                                        "    return [-2.0 * len(c) for c in completions]\n")
    assert _plan(workdir, target) == {"online_score": 1, "online_select": 1}
    # Round 1's model too: every step from the scores on, and not the sampling.
    assert _plan(workdir, "results/online/round-1/model") == {
        "online_score": 1, "online_select": 1, "online_validate": 1, "online_reference": 1, "online_align": 1}
