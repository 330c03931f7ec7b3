"""Training in several processes: `accelerate launch --num_processes 2` on the CPU (gloo).

SFT, DPO and GDPO run the way a pipeline rule with `processes: 2` (or `gpu: 2`)
runs them: a spec of the step, `accelerate launch ... -m lexalign.pipeline.launch SPEC`.
Two processes at per-device batch B must log the same losses, step for step,
as one process at batch 2B (the same global batch), and write one model.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, write_jsonl

from lexalign.pipeline.launch import launch_command, load_spec, run_launcher, write_spec
from lexalign.pipeline.scale import num_processes

STEPS = 3
GLOBAL_BATCH = 8
PROCESSES = 2


# --- how many processes a rule asks for (fast) ---------------------------------------------------


@pytest.mark.parametrize(("resources", "expected"), [
    ({}, 1),
    ({"gpu": 4}, 4),
    ({"gpus": 2}, 2),
    ({"gpu": "a100:8"}, 8),
    ({"gres": "gpu:2"}, 2),
    ({"gres": "gpu:h100:4"}, 4),
    ({"gres": "gpu"}, 1),
    ({"gres": "tmpdisk:100"}, 1),
    ({"processes": 2}, 2),
    ({"processes": 3, "gpu": 8}, 3),  # explicit wins
    ({"mem_mb": 8000, "runtime": 60}, 1),
])
def test_processes_follow_the_rule_resources(resources, expected):
    assert num_processes(resources) == expected


def test_launch_command_uses_torchrun_or_the_named_config(tmp_path):
    cmd = launch_command(tmp_path / "spec.json", 2, threads=4, port=29999)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_cpu_threads_per_process") + 1] == "2"
    assert cmd[-3:] == ["-m", "lexalign.pipeline.launch", str(tmp_path / "spec.json")]
    config = REPO / "config/accelerate/fsdp.yaml"
    cmd = launch_command([tmp_path / "a.json", tmp_path / "b.json"], 4, config_file=str(config), port=29999)
    assert cmd[cmd.index("--config_file") + 1] == str(config) and "--multi_gpu" not in cmd
    assert cmd[-2:] == [str(tmp_path / "a.json"), str(tmp_path / "b.json")]


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero3", "cpu_2proc"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "config/accelerate" / f"{name}.yaml"))
    assert config.num_machines == 1
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED", "cpu_2proc": "MULTI_GPU"}[name]
    assert str(config.distributed_type).split(".")[-1] == expected
    if name == "fsdp":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # one file the main process writes
    if name == "deepspeed_zero3":
        assert config.deepspeed_config["zero_stage"] == 3
        assert config.deepspeed_config["zero3_save_16bit_model"] is True


# --- the same losses in one and in two processes (real training) --------------------------------




def _spec(path: Path, step: str, arguments: dict) -> Path:
    """A launch spec as lexalign.pipeline.launch writes it: the step and its arguments by name."""
    return write_spec(step, arguments, path)


def _cases(root: Path, model: Path) -> dict[str, dict]:
    """Each stage's step, params (but the batch size) and inputs, on the demo model and data."""
    from lexalign.config.loader import section_defaults
    from lexalign.demo import task
    from lexalign.steps import inputs

    write_jsonl(root / "raw/sft/train.jsonl", task.sft_rows(0, 64))
    inputs.prepare_sft(raw=root / "raw/sft", output=root / "data/sft", data={"eval_fraction": 0.0001}, seed=0)
    write_jsonl(root / "raw/pairs/train.jsonl", task.preference_rows(0, 64))
    inputs.validate(raw=root / "raw/pairs", tokenizer=model, output=root / "data/pairs",
                    dataset={"eval_fraction": 0.1, "max_length": 64})
    common = {"max_steps": STEPS, "logging_steps": 1, "save_steps": 1000, "max_length": 64, "lora_dropout": 0.0,
              "warmup_steps": 0, "gradient_accumulation_steps": 1}
    cases = {
        "sft": ("finetune", "finetune", section_defaults("finetune", {**common, "learning_rate": 3e-3}),
                root / "data/sft"),
        "dpo": ("align", "alignment", section_defaults("alignment", {**common, "learning_rate": 1e-3, "beta": 0.1}),
                root / "data/pairs"),
    }
    write_jsonl(root / "raw/ranked/train.jsonl", task.ranked_rows(0, 64, 3))
    inputs.validate(raw=root / "raw/ranked", tokenizer=model, output=root / "data/ranked",
                    dataset={"eval_fraction": 0.1, "max_length": 64, "group_size": 3})
    gdpo = section_defaults("alignment", {**common, "learning_rate": 1e-3, "beta": 0.1, "method": "gdpo",
                                          "group_delay_size": 3})
    cases["gdpo"] = ("align", "alignment", gdpo, root / "data/ranked")
    return {
        name: {"step": step, "section": section, "params": params, "inputs": {"model": str(model), "data": str(data)}}
        for name, (step, section, params, data) in cases.items()
    }


def _specs(root: Path, cases: dict, processes: int) -> dict[str, Path]:
    specs = {}
    for name, case in cases.items():
        run = root / f"{name}-{processes}"
        run.mkdir()
        arguments = {case["section"]: {**case["params"], "batch_size": GLOBAL_BATCH // processes}, "device": "cpu",
                     "seed": 11, "trust_remote_code": False, "checkpoint_dir": str(run / "checkpoints"),
                     "output": str(run / "model"), **case["inputs"]}
        specs[name] = _spec(run / "spec.json", case["step"], arguments)
    return specs


def _losses(model_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_model_dir):
    """Every case trained once in one process (in here) and once in two (one `accelerate launch` for all)."""
    from lexalign import steps

    root = tmp_path_factory.mktemp("multiprocess")
    cases = _cases(root, demo_model_dir)
    one, two = _specs(root, cases, 1), _specs(root, cases, PROCESSES)
    for spec in one.values():
        step, arguments = load_spec(spec)
        steps.run(step, **arguments)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = root / "launch.log"
    started = time.monotonic()
    with log.open("w") as handle:
        cmd = launch_command(list(two.values()), PROCESSES, threads=PROCESSES)
        status = run_launcher(cmd, env=env, stdout=handle, stderr=handle, timeout=300)
    text = log.read_text()
    assert status == 0, text[-5000:]
    return {"one": {k: v.parent / "model" for k, v in one.items()},
            "two": {k: v.parent / "model" for k, v in two.items()},
            "log": text, "seconds": time.monotonic() - started}


def _case_names():
    return ["sft", "dpo", "gdpo"]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("case", _case_names())
def test_two_processes_give_the_losses_of_one(runs, case):
    one, two = _losses(runs["one"][case]), _losses(runs["two"][case])
    # One line per step: only the main process writes metrics.jsonl.
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, STEPS + 1)), runs["log"][-3000:]
    for (step, expected), (_, got) in zip(one, two, strict=True):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), f"{case} step {step}: {got} vs {expected}"


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("case", _case_names())
def test_two_processes_write_one_model_that_loads(runs, case):
    import torch
    from transformers import AutoModelForCausalLM

    out = runs["two"][case]
    parent = out.parent
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(".model.")]
    assert not leftovers, f"temporary folders left beside the model: {leftovers}"
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["metrics"]["global_step"] == STEPS
    two = AutoModelForCausalLM.from_pretrained(out).state_dict()
    one = AutoModelForCausalLM.from_pretrained(runs["one"][case]).state_dict()
    assert set(one) == set(two)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-4, f"{case}: weights differ by up to {worst}"
    assert all(torch.isfinite(v).all() for v in two.values())
