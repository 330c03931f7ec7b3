"""An online round's generation and reward-model scoring in several processes (`scale.generate`, `scale.score`).

The steps run as a rule with those entries runs them: `accelerate launch --num_processes 2` on the CPU (gloo),
each process sampling its shards or scoring its share of the batches (lexalign.core.shares), the main process joining
them. Compared with one process: the same generations (token for token, and byte for byte the same parquet) and
the same scores; a two-process generation killed mid-way resumes from the shards its processes finished; a score
cached by any process of a killed attempt is never asked again. And what the two entries ask Snakemake for.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, Counting, online_rows, write_reward_model

from lexalign.config.loader import validate_config
from lexalign.core.errors import LexAlignError
from lexalign.generation.completion_scores import DemoJudge, RewardModelJudge, ScoreCache, score_completions
from lexalign.pipeline.launch import launch_command, processes_for, run_launcher, write_spec
from lexalign.pipeline.scale import check_nodes, scale_resources
from lexalign.steps import inputs, rounds
from workflow import copy_workflow, snakemake

PROCESSES = 2
PROMPTS = 16
SAMPLING = {"samples_per_prompt": 3, "temperature": 1.3, "top_p": 1.0, "max_new_tokens": 24, "seed": 7,
            "batch_size": 2, "shard_prompts": 2, "max_prompt_tokens": None, "per_round": None}
SHARDS = PROMPTS // SAMPLING["shard_prompts"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LEXALIGN_COLLECTIVE_TIMEOUT": "120"}


class Round:
    """One round's folder: the generate and score steps' arguments, as the rules give them."""

    def __init__(self, root: Path, model: Path, prompts: Path, reward: Path):
        self.folder = root / "round-1"
        self.generations = self.folder / "generations"
        self.scores = self.folder / "scores-reward_model.parquet"
        self.cache = root / "cache" / "reward_model.jsonl"
        self.shards = self.folder / ".generations-work" / "shards"
        self.selection, self.data = self.folder / "selection.jsonl", self.folder / "preferences"
        self.reference = {"model": str(model), "data": str(self.data), "selection": str(self.selection),
                          "output": str(self.folder / "reference.parquet"), "device": "cpu",
                          "setting": {"layout": "pairs", "max_length": 64, "truncation_mode": "keep_start",
                                      "load_in_4bit": False}}
        self.generate = {"model": str(model), "prompts": str(prompts), "output": str(self.generations),
                         "number": 1, "sampling": SAMPLING, "device": "cpu"}
        self.score = {"generations": str(self.generations), "output": str(self.scores), "judge": "reward_model",
                      "cache": str(self.cache), "reward_model": [str(reward)], "llm_judge": None, "device": "cpu"}

    def specs(self, steps=("generate", "score")) -> list[Path]:
        self.folder.mkdir(parents=True, exist_ok=True)
        return [write_spec(f"online_{step}", getattr(self, step), self.folder.parent / f"{step}.json")
                for step in steps]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_model_dir):
    """The round in this process; a two-process generation killed after its first shards; then one launch of two
    processes that runs the round afresh and resumes the killed generation."""
    from lexalign.demo import task

    root = tmp_path_factory.mktemp("online-shards")
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps({"rendered": False, "prompts": task.eval_prompts(0, PROMPTS)}))
    reward = write_reward_model(root / "reward", demo_model_dir)
    one, two, resumed = (Round(root / name, demo_model_dir, prompts, reward) for name in ("one", "two", "resumed"))
    started = time.monotonic()
    rounds.online_generate(**one.generate)
    rounds.online_score(**one.score)
    # The round's pairs through the existing validation, and their reference log-probs of the sampled ids.
    rounds.online_select(generations=one.generations, scores=one.scores, output=one.selection,
                         report=one.folder / "selection.json", select={"select": "best_worst", "truncated": "keep",
                                                                       "group_size": 2})
    inputs.validate(raw=one.selection, tokenizer=demo_model_dir, output=one.data,
                    dataset={"eval_fraction": 0.25, "max_length": 64}, pairs_only=True)
    rounds.online_reference(**one.reference)
    alone = time.monotonic() - started

    # Killed: SIGKILL to the launcher and its processes (each in a session of its own) once a shard is on disk,
    # as a node failure stops them.
    killed_log = root / "killed.log"
    with killed_log.open("w") as handle:
        process = subprocess.Popen(launch_command(resumed.specs(["generate"]), PROCESSES, threads=PROCESSES),
                                   env=_env(), stdout=handle, stderr=handle)
    launcher, deadline, done = psutil.Process(process.pid), time.monotonic() + 120, []
    while time.monotonic() < deadline and process.poll() is None:
        done = sorted(resumed.shards.glob("shard-*.parquet")) if resumed.shards.is_dir() else []
        if done:
            break
        time.sleep(0.01)
    for each in [launcher, *launcher.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            each.kill()
    process.wait(timeout=60)
    kept = {path.name: path.stat().st_mtime_ns for path in resumed.shards.glob("shard-*.parquet")}
    assert done and 0 < len(kept) < SHARDS, (kept, killed_log.read_text()[-3000:])

    log = root / "launch.log"
    started = time.monotonic()
    with log.open("w") as handle:
        # Two processes also score the reference log-probs of one's validated round (scale.reference).
        reference = {**one.reference, "output": str(two.folder / "reference.parquet")}
        two.folder.mkdir(parents=True, exist_ok=True)
        reference_spec = write_spec("online_reference", reference, root / "reference.json")
        status = run_launcher(launch_command([*two.specs(), reference_spec, *resumed.specs(["generate"])], PROCESSES,
                                             threads=PROCESSES), env=_env(), stdout=handle, stderr=handle,
                              timeout=300)
    text = log.read_text()
    assert status == 0, text[-5000:]
    print(f"\none process: {alone:.1f} s; two launched processes: {time.monotonic() - started:.1f} s; "
          f"{len(kept)} of {SHARDS} shards kept from the killed run")
    return {"one": one, "two": two, "resumed": resumed, "kept": kept, "log": text}


def _ids(folder: Path) -> list[tuple]:
    table = pq.read_table(folder / "generations.parquet")
    return list(zip(*(table.column(c).to_pylist() for c in ("row", "prompt_ids", "completion_ids")), strict=True))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_sample_the_tokens_of_one(runs):
    one, two = runs["one"].generations, runs["two"].generations
    assert _ids(two) == _ids(one) and len(_ids(one)) == PROMPTS
    assert len({tuple(c) for _, _, group in _ids(one) for c in group}) > PROMPTS  # samples, not one answer each
    assert (two / "generations.parquet").read_bytes() == (one / "generations.parquet").read_bytes()
    report = json.loads((two / "report.json").read_text())
    assert (report["shards"], report["shards_generated"], report["processes"]) == (SHARDS, SHARDS, PROCESSES)
    for rank in range(PROCESSES):  # shard n is process n % 2's
        assert f"[rank {rank}/{PROCESSES}] sampled {SHARDS // PROCESSES} of the {SHARDS} shards" in runs["log"]
    assert f"{SHARDS} of {SHARDS} shards sampled now by {PROCESSES} processes" in runs["log"]
    assert not (two.parent / ".generations-work").exists()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_killed_two_process_generation_resumes_from_its_shards(runs):
    resumed, kept = runs["resumed"], runs["kept"]
    report = json.loads((resumed.generations / "report.json").read_text())
    assert report["shards_generated"] == SHARDS - len(kept)  # the killed run's shards were not sampled again
    assert f"{SHARDS - len(kept)} of {SHARDS} shards sampled now by {PROCESSES} processes" in runs["log"]
    assert (resumed.generations / "generations.parquet").read_bytes() == \
        (runs["one"].generations / "generations.parquet").read_bytes()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_score_what_one_scores_each_score_asked_once(runs):
    one, two = runs["one"], runs["two"]
    assert pq.read_table(two.scores).equals(pq.read_table(one.scores), check_metadata=True)
    scores = [s for group in pq.read_table(one.scores).column("scores").to_pylist() for s in group]
    assert len(scores) == PROMPTS * SAMPLING["samples_per_prompt"] and len(set(scores)) > 1
    shares = [int(n) for n in runs["log"].split("Gathered the values of 2 processes (")[-1].split(" each")[0]
              .split(", ")]
    assert len(shares) == PROCESSES and all(shares)
    # Every score in the cache once, the processes' own files folded into it: a rerun asks nothing.
    lines = [json.loads(line) for line in two.cache.read_text().splitlines()]
    assert len(lines) == len({entry["key"] for entry in lines}) == len(scores)
    assert {e["key"]: e["score"] for e in lines} == ScoreCache(one.cache).scores
    assert [p.name for p in two.cache.parent.iterdir()] == [two.cache.name]
    judge = RewardModelJudge(two.score["reward_model"][0], chat=False)
    rows = pq.read_table(two.generations / "generations.parquet").to_pylist()
    again, counts = score_completions(rows, judge, two.cache)
    assert counts["asked"] == 0 and judge._loaded is None
    assert [s for group in again for s in group] == scores


def test_a_score_cached_by_a_killed_process_is_never_asked_again(tmp_path):
    """Process 1 of a killed attempt had cached two scores in its own file: the rerun (one process here) reads
    them, asks the judge only for the others, and folds that file into the cache."""
    rows, cache = online_rows(n=3), tmp_path / "scores.jsonl"
    first = Counting(DemoJudge())
    score_completions(rows[:1], first, cache)  # the main process's file
    ScoreCache(cache, rank=1).put(dict(zip(("a", "b"), (0.5, 0.25), strict=True)))
    from lexalign.generation.completion_scores import score_key

    done = {score_key(r["policy_hash"], r["prompt"], r["completion_ids"][0], "demo"): 1.0 for r in rows[1:]}
    ScoreCache(cache, rank=1).put(done)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".scores.jsonl.part-1.jsonl", "scores.jsonl"]
    judge = Counting(DemoJudge())
    scores, counts = score_completions(rows, judge, cache)
    assert counts["asked"] == 2 and len(judge.asked) == 2  # rows 1 and 2's second answers
    assert scores == [[1.0, 0.0]] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["scores.jsonl"]
    assert len(ScoreCache(cache).scores) == 2 + 2 + 2 + 2  # row 0's, "a" and "b", the two done, the two asked


# --- what scale.generate and scale.score ask for ----------------------------------------------------------


def _scale(**sections) -> dict:
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["scale"] = sections
    return validate_config(config, "pipeline")["scale"]


@pytest.mark.parametrize("section, step", [("generate", "online_generate"), ("score", "online_score")])
def test_generate_and_score_ask_for_their_processes_and_gpus(section, step):
    assert _scale()[section] == {"nodes": 1, "processes_per_node": None}
    resources = scale_resources(_scale(**{section: {"processes_per_node": 4}}), section, "cuda")
    assert resources == {"nodes": 1, "processes": 4, "gres": "gpu:4", "collective_timeout": 1800,
                         "accelerate_config": "config/accelerate/ddp.yaml"}
    assert processes_for(step, resources) == 4
    several = scale_resources(_scale(**{section: {"nodes": 2, "processes_per_node": 1}}), section, "cpu")
    assert several["tasks"] == 2 and several["mpi"] == "srun" and "gres" not in several
    what = {"generate": "sampling", "score": "scoring"}[section]
    with pytest.raises(LexAlignError, match=f"scale.{section}.nodes is 2: {what} the round's completions on "
                                            "several nodes needs SLURM"):
        check_nodes(_scale(**{section: {"nodes": 2}}), "slurm", None)
    with pytest.raises(LexAlignError, match=f'"scale.{section}.backend"'):
        _scale(**{section: {"backend": "fsdp"}})


def _resources(output: str, rule: str) -> dict[str, str]:
    """The resources a dry run prints for the job of `rule`."""
    block = output.split(f"rule {rule}:", 1)[1].split("\n\n", 1)[0]
    line = next(line for line in block.splitlines() if line.strip().startswith("resources:"))
    return dict(item.split("=", 1) for item in line.split("resources:", 1)[1].strip().split(", "))


@pytest.mark.parametrize("judge", ["reward_model", "llm"])
def test_the_rules_take_their_resources_from_scale(tmp_path, judge):
    workdir = copy_workflow(tmp_path / "wf")
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.update(device="cpu", scale={"timeout": 300, "generate": {"processes_per_node": 2},
                                       "score": {"processes_per_node": 3}},
                  online={"rounds": 1, "prompts": {"from": "demo", "per_round": 4}, "judge": judge,
                          "sampling": {"max_new_tokens": 8}, "alignment": {"method": "dpo"}})
    config["evaluate"] = {**config["evaluate"], "reward_model": {"path": "reward"},
                          "llm_judge": {"base_url": "http://127.0.0.1:9/v1", "model": "judge"}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    (workdir / "reward").mkdir()
    done = snakemake(workdir, "-n", f"results/online/round-1/scores-{judge}.parquet")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    generate, score = _resources(done.stdout, "online_generate"), _resources(done.stdout, "online_score")
    assert (generate["processes"], generate["nodes"], generate["collective_timeout"]) == ("2", "1", "300")
    if judge == "reward_model":
        assert (score["processes"], score["collective_timeout"]) == ("3", "300")
    else:  # the LLM judge scores in one process: the entry asks for nothing
        assert "processes" not in score and "collective_timeout" not in score


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_write_the_rounds_reference_file_of_one(runs):
    """scale.reference sizes each round's reference step too: two processes, one file, the one process's values."""
    one = pq.read_table(runs["one"].folder / "reference.parquet")
    two = pq.read_table(runs["two"].folder / "reference.parquet")
    assert one.num_rows >= 8 and two.to_pylist() == one.to_pylist()
    assert two.schema.metadata == one.schema.metadata
    assert f"over {PROCESSES} processes" in runs["log"]
