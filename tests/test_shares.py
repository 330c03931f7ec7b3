"""The reference step and evaluation across several processes: each scores its share of the batches, the main
process writes the file one process writes.

Fast: the row split and its gather as pure functions, the part files, and what the `scale` section asks for.
Slow (multiprocess): both steps under `accelerate launch --num_processes 2` on the CPU (gloo), as a rule with
`scale.reference` / `scale.evaluate` runs them, compared with one process: the same parquet rows and values,
the same eval json.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_jsonl, write_reward_model

from lexalign.config.loader import validate_config
from lexalign.core.errors import LexAlignError
from lexalign.core.shares import Share, chunks, deal, piece, restore, write_part
from lexalign.models.packing import budget_batches
from lexalign.pipeline.launch import launch_command, processes_for, run_launcher, write_spec
from lexalign.pipeline.scale import check_nodes, scale_resources

# --- the row split (pure) ----------------------------------------------------------------------------


def _split_and_restore(batches: list[list[int]], n: int, world: int, start: int = 0) -> tuple[list, list]:
    """Each rank's rows when `batches` are dealt over `world` ranks, and the values gathered back."""
    values = [f"row {i}" for i in range(n)]
    shares = [deal(batches, rank, world, start) for rank in range(world)]
    pieces = [piece(share, values) for share in shares]
    return [p["rows"] for p in pieces], restore(pieces, n)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("batches", [
    chunks(7, 2),  # generation's batches: [0, 1] [2, 3] [4, 5] [6]
    chunks(7, 1),
    [[3, 6], [0], [5, 1, 2], [4]],  # packed batches: longest first, rows out of order
    budget_batches([5, 40, 12, 33, 8, 21, 17], budget=45),
], ids=["pairs", "single", "shuffled", "budget"])
def test_seven_rows_on_two_and_three_ranks_each_once_in_order(batches, world):
    for start in range(world):  # whatever the batches dealt before in the step
        rows, gathered = _split_and_restore(batches, 7, world, start)
        assert sorted(r for share in rows for r in share) == list(range(7))
        assert gathered == [f"row {i}" for i in range(7)]
        sizes = [len(deal(batches, rank, world, start)) for rank in range(world)]
        assert max(sizes) - min(sizes) <= 1  # whole batches, in turn: no rank holds two more than another


def test_dealing_goes_on_across_the_step():
    """Batches of several lists are dealt in turn over the whole step, so one-batch lists spread too."""
    shares = [Share(rank=rank, world=2) for rank in range(2)]
    for _ in range(3):
        for s in shares:
            s.take([[0]])
    assert [s.dealt for s in shares] == [3, 3]
    assert [s.take([[0], [1]]) for s in shares] == [[[1]], [[0]]]


def test_one_process_takes_every_batch_and_writes_nothing(tmp_path):
    share = Share(output=tmp_path / "out.json")
    batches = budget_batches([3, 9, 4], budget=10)
    assert share.take(batches) == batches
    assert share.gather({"x": piece(batches, [1.0, 2.0, 3.0])}, {"x": 3}) == {"x": [1.0, 2.0, 3.0]}
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("pieces, message", [
    ([{"rows": [0, 1], "values": [1, 2]}], "1 of the 3 rows of logps are in no process's part"),
    ([{"rows": [0, 1], "values": [1, 2]}, {"rows": [1, 2], "values": [2, 3]}], "row 1 of 3 is in two parts"),
    ([{"rows": [0, 1, 2, 3], "values": [1, 2, 3, 4]}], "row 3 of 3 is out of range"),
])
def test_parts_that_do_not_cover_every_row_once_are_a_clear_error(pieces, message):
    with pytest.raises(LexAlignError, match=message):
        restore(pieces, 3, "logps")


def test_the_main_process_gathers_the_parts_and_removes_them(tmp_path):
    output = tmp_path / "pairs-max64.parquet"
    main, other = Share(rank=0, world=2, output=output), Share(rank=1, world=2, output=output)
    values = [0.1 * i for i in range(5)]
    batches = chunks(5, 2)
    for share in (main, other):
        write_part(share.part_path(share.rank), {"train": piece(share.take(batches), values)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pairs-max64.parquet.part-0-of-2.json",
                                                         ".pairs-max64.parquet.part-1-of-2.json"]
    assert main.read_parts({"train": 5}) == {"train": values}  # floats exactly: JSON keeps every bit
    assert not list(tmp_path.iterdir())


def test_a_missing_part_is_named_and_no_part_is_left(tmp_path):
    main = Share(rank=0, world=2, output=tmp_path / "eval.json")
    write_part(main.part_path(0), {"kl": piece([[0]], [0.5])})
    with pytest.raises(LexAlignError, match=r"Process 1's part is missing: .*\.eval\.json\.part-1-of-2\.json") as err:
        main.read_parts({"kl": 2})
    assert "filesystem every node shares" in err.value.render()
    assert not list(tmp_path.iterdir())


# --- what the scale section asks for -----------------------------------------------------------------


def _scale(**steps) -> dict:
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["scale"] = steps
    return validate_config(config, "pipeline")["scale"]


@pytest.mark.parametrize("step", ["reference", "evaluate"])
def test_scoring_steps_ask_for_their_processes_and_gpus(step):
    assert _scale()[step] == {"nodes": 1, "processes_per_node": None}
    resources = scale_resources(_scale(**{step: {"processes_per_node": 4}}), step, "cuda")
    assert resources == {"nodes": 1, "processes": 4, "gres": "gpu:4", "collective_timeout": 1800,
                         "accelerate_config": "config/accelerate/ddp.yaml"}
    assert processes_for(step, resources) == 4
    assert processes_for(step, scale_resources(_scale(), step, "cpu")) == 1
    several = scale_resources(_scale(**{step: {"nodes": 2, "processes_per_node": 1}}), step, "cpu")
    assert several["tasks"] == 2 and several["mpi"] == "srun" and "gres" not in several
    with pytest.raises(LexAlignError, match=f"scale.{step}.nodes is 2: running the {step} step on several nodes "
                                            "needs SLURM"):
        check_nodes(_scale(**{step: {"nodes": 2}}), "slurm", None)


def test_a_scoring_step_has_no_backend_to_choose():
    with pytest.raises(LexAlignError) as err:
        _scale(reference={"backend": "fsdp"})
    assert "scale.reference" in err.value.render() and "backend" in err.value.render()


def test_other_steps_stay_in_one_process():
    assert processes_for("lm_eval", {"processes": 4}) == 1
    assert processes_for("report", {"gpu": 2}) == 1


# --- two processes write the files of one (real scoring under accelerate launch) ---------------------


PROCESSES = 2
EVALUATE = {"num_prompts": 6, "num_samples": 4, "max_new_tokens": 8, "batch_size": 2, "judge": "reward_model"}
REFERENCE_SETTINGS = {  # output name → (data, setting): DPO's pairs, KTO's rows from the same pairs, GDPO's K = 3
    "pairs": ("pairs", {"layout": "pairs", "max_length": 48}),
    "unpaired": ("pairs", {"layout": "unpaired", "max_length": 64}),
    "k3": ("ranked", {"layout": "k3", "max_length": 64}),
}


def _aligned_model(root: Path, demo: Path) -> Path:
    """The demo model with its weights moved (seeded): log-probs, answers and rewards that differ from it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.05 * torch.randn(weight.shape, generator=generator))
    model.save_pretrained(root / "aligned")
    AutoTokenizer.from_pretrained(demo).save_pretrained(root / "aligned")
    return root / "aligned"


def _inputs(root: Path, demo: Path) -> dict[str, Path]:
    from lexalign.demo import task
    from lexalign.steps import inputs

    write_jsonl(root / "raw/pairs/train.jsonl", task.preference_rows(0, 64))
    inputs.validate(raw=root / "raw/pairs", tokenizer=demo, output=root / "data/pairs",
                    dataset={"eval_fraction": 0.5, "max_length": 64})
    write_jsonl(root / "raw/ranked/train.jsonl", task.ranked_rows(0, 40, 3))
    inputs.validate(raw=root / "raw/ranked", tokenizer=demo, output=root / "data/ranked",
                    dataset={"eval_fraction": 0.5, "max_length": 64, "group_size": 3})
    return {"pairs": root / "data/pairs", "ranked": root / "data/ranked", "aligned": _aligned_model(root, demo),
            "reward": write_reward_model(root / "reward", demo)}


def _specs(run: Path, inputs: dict[str, Path], demo: Path) -> list[Path]:
    """One run's specs (as lexalign.pipeline.launch writes them): every reference file, then the evaluation."""
    run.mkdir()
    specs = []
    for name, (data, setting) in REFERENCE_SETTINGS.items():
        output = run / "reference" / f"{name}.parquet"
        arguments = {"model": str(demo), "data": str(inputs[data]), "output": str(output),
                     "setting": {"truncation_mode": "keep_start", "load_in_4bit": False, **setting}, "device": "cpu",
                     "trust_remote_code": False, "cache_dir": str(run / "cache")}
        specs.append(write_spec("reference", arguments, run / f"reference-{name}.json"))
    arguments = {"aligned": str(inputs["aligned"]), "reference": str(demo), "data": str(inputs["pairs"]),
                 "ranked": [str(inputs["ranked"])], "reward_model": [str(inputs["reward"])],
                 "output": str(run / "eval" / "aligned.json"), "beta": 0.1, "seed": 3, "device": "cpu",
                 "evaluate": {**EVALUATE, "reward_model": {"path": str(inputs["reward"])}}}
    specs.append(write_spec("evaluate", arguments, run / "evaluate.json"))
    return specs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_model_dir):
    """Every spec run once in this process and once in two launched processes (one `accelerate launch`)."""
    from lexalign import steps
    from lexalign.pipeline.launch import load_spec

    root = tmp_path_factory.mktemp("shards")
    inputs = _inputs(root, demo_model_dir)
    one, two = _specs(root / "one", inputs, demo_model_dir), _specs(root / "two", inputs, demo_model_dir)
    started = time.monotonic()
    for spec in one:
        step, arguments = load_spec(spec)
        steps.run(step, **arguments)
    alone = time.monotonic() - started
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LEXALIGN_COLLECTIVE_TIMEOUT": "120"}
    log = root / "launch.log"
    started = time.monotonic()
    with log.open("w") as handle:
        status = run_launcher(launch_command(two, PROCESSES, threads=PROCESSES), env=env, stdout=handle,
                              stderr=handle, timeout=300)
    text = log.read_text()
    assert status == 0, text[-5000:]
    print(f"\none process: {alone:.1f} s; two launched processes: {time.monotonic() - started:.1f} s")
    return {"one": root / "one", "two": root / "two", "log": text}


def _numbers_apart(a, b, path: str = "") -> float:
    """The largest difference between two JSON values' numbers; anything else must be equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        return max((_numbers_apart(a[k], b[k], f"{path}.{k}") for k in a), default=0.0)
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        return max((_numbers_apart(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True))),
                   default=0.0)
    if isinstance(a, float) and isinstance(b, float):
        return 0.0 if a == b or (math.isnan(a) and math.isnan(b)) else abs(a - b)
    assert a == b and type(a) is type(b), f"{path}: {a!r} vs {b!r}"
    return 0.0


def _leftovers(run: Path) -> list[str]:
    return [p.name for p in run.rglob(".*") if ".part-" in p.name or ".tmp-" in p.name]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFERENCE_SETTINGS))
def test_two_processes_write_the_reference_file_of_one(runs, name):
    import pyarrow.parquet as pq

    one = pq.read_table(runs["one"] / "reference" / f"{name}.parquet")
    two = pq.read_table(runs["two"] / "reference" / f"{name}.parquet")
    assert two.schema.equals(one.schema, check_metadata=True)  # the same columns and key
    for column in ("split", "row", "prompt_ids", "completion_ids", "scores"):
        assert two.column(column).to_pylist() == one.column(column).to_pylist(), column
    expected, got = one.column("ref_logps").to_pylist(), two.column("ref_logps").to_pylist()
    worst = max(abs(x - y) for a, b in zip(expected, got, strict=True) for x, y in zip(a, b, strict=True))
    print(f"\n{name}: {one.num_rows} groups, largest log-prob difference {worst}")
    assert worst <= 1e-5, f"{name}: log-probs differ by up to {worst}"
    assert not _leftovers(runs["two"] / "reference"), _leftovers(runs["two"] / "reference")
    assert "over 2 processes" in runs["log"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_every_process_scored_a_share(runs):
    import re

    shares = re.findall(r"Gathered the values of 2 processes \((\d+), (\d+) each\)", runs["log"])
    assert len(shares) == len(REFERENCE_SETTINGS) + 1, runs["log"][-3000:]  # each reference file, the evaluation
    assert all(int(n) > 0 for share in shares for n in share), shares


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_write_the_eval_json_of_one(runs):
    one = json.loads((runs["one"] / "eval/aligned.json").read_text())
    two = json.loads((runs["two"] / "eval/aligned.json").read_text())
    # Every measure dealt over the processes is in it: pairs, ranked groups, the KL estimate, answers, their rewards.
    assert one["pairs"] == 32 and one["ranking_k"] == 3 and one["kl_estimate"] is not None
    assert one["decoding"]["prompts"] == 6 and one["judge"]["n"] == 6 and one["judge"]["mean_reward_sft"] is not None
    worst = _numbers_apart(one, two)
    print(f"\neval json: largest difference {worst}")
    assert worst <= 1e-5
    assert not _leftovers(runs["two"] / "eval"), _leftovers(runs["two"] / "eval")


def test_the_numbers_check_sees_a_difference():
    assert _numbers_apart({"a": [1.0, {"b": 2.0}]}, {"a": [1.0, {"b": 2.5}]}) == 0.5
    with pytest.raises(AssertionError):
        _numbers_apart({"a": "x"}, {"a": "y"})


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_process_that_fails_fails_the_step_at_once_with_its_message(tmp_path, demo_model_dir, monkeypatch, capfd):
    """A model without weights: the first process to find it stops, the launcher ends the other (wherever it
    is: loading, or waiting at a barrier), and the step fails with that process's message, long before a
    barrier's timeout."""
    from lexalign.demo import task
    from lexalign.pipeline.launch import run_in_processes
    from lexalign.steps import inputs

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LEXALIGN_COLLECTIVE_TIMEOUT", "600")  # run_in_processes sets it: restored afterwards
    data = tmp_path / "data"
    write_jsonl(tmp_path / "raw/train.jsonl", task.preference_rows(0, 16))
    inputs.validate(raw=tmp_path / "raw", tokenizer=demo_model_dir, output=data, dataset={"eval_fraction": 0.25})
    empty = tmp_path / "no-weights"
    empty.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (empty / name).write_bytes((demo_model_dir / name).read_bytes())
    arguments = {"model": str(empty), "data": str(data), "output": str(tmp_path / "ref/pairs-max64.parquet"),
                 "setting": {"layout": "pairs", "max_length": 64}, "device": "cpu", "cache_dir": str(tmp_path / "c")}
    started = time.monotonic()
    with pytest.raises(LexAlignError, match="reference failed in one of its 2 processes"):
        run_in_processes("reference", arguments, 2, {"processes": 2, "collective_timeout": 600}, threads=2,
                         log_dir=tmp_path / "logs")
    took = time.monotonic() - started
    output = capfd.readouterr()
    text = output.out + output.err
    assert "Running the reference step in 2 processes" in text
    assert f'No model at "{empty}"' in text and "Missing: weights" in text, text[-3000:]
    assert took < 120, f"the step took {took:.0f} s to fail"
    assert not list((tmp_path / "logs").iterdir())  # the spec is removed
    assert not (tmp_path / "ref").exists() or not list((tmp_path / "ref").iterdir())  # no file, no part
