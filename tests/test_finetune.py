"""SFT for real on the tiny demo model: methods, data shapes, checkpoints, resume, interrupts, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import signal_at
from transformers import AutoModelForCausalLM, TrainerCallback

from lexalign.config.loader import section_defaults
from lexalign.config.sections import FinetuneConfig
from lexalign.core.errors import LexAlignError, TrainingInterrupted
from lexalign.demo import task
from lexalign.train.finetune import FinetuneJob

pytestmark = pytest.mark.slow


def job_for(tmp_path: Path, base: Path, train: pd.DataFrame | None = None, evals: pd.DataFrame | None = None,
            **params) -> FinetuneJob:
    params = {"learning_rate": 3e-3, "batch_size": 8, "max_steps": 3, "max_length": 64, "save_steps": 1000,
              "logging_steps": 1, "lora_dropout": 0.0, **params}
    train = train if train is not None else pd.DataFrame(task.sft_rows(0, 64))
    return FinetuneJob(
        model_path=base,
        train=train,
        eval=evals if evals is not None else train.iloc[:0],
        cfg=FinetuneConfig.from_dict(section_defaults("finetune", params)),
        output_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "checkpoints",
        device="cpu",
        seed=7,
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def losses(path: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_each_method_trains_and_saves_a_loadable_model(tmp_path, demo_model_dir, method):
    before = weights(demo_model_dir)
    out = job_for(tmp_path, demo_model_dir, method=method).run()
    after = weights(out)  # loads with AutoModelForCausalLM as it is
    assert set(after) == set(before)
    changed = [k for k in before if not torch.allclose(before[k], after[k])]
    assert any("q_proj" in k for k in changed), f"{method}: attention weights unchanged"
    if method == "full":
        assert any("embed_tokens" in k for k in changed)
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["config"]["method"] == method and lineage["metrics"]["global_step"] == 3
    assert not list(out.glob("adapter_*")), "merged output must be a plain model"


def test_adapter_alone_loads_with_peft(tmp_path, demo_model_dir):
    from peft import AutoPeftModelForCausalLM

    out = job_for(tmp_path, demo_model_dir, merge=False).run()
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_auto_target_modules_follow_the_architecture(tmp_path, demo_model_dir):
    out = job_for(tmp_path, demo_model_dir, merge=False, target_modules="auto").run()
    targets = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("shape", ["text", "prompt_completion", "messages"])
def test_every_data_shape_trains(tmp_path, demo_model_dir, shape):
    rows = task.sft_rows(0, 32)
    if shape == "text":
        frame = pd.DataFrame({"text": [r["prompt"] + r["completion"] for r in rows]})
    elif shape == "messages":
        frame = pd.DataFrame({"messages": [[{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["completion"]}] for r in rows]})
    else:
        frame = pd.DataFrame(rows)
    job = job_for(tmp_path, demo_model_dir, train=frame, max_steps=2)
    job.run()
    assert len(losses(job.output_dir / "metrics.jsonl")) == 2


def test_eval_split_is_evaluated_every_eval_steps(tmp_path, demo_model_dir):
    rows = pd.DataFrame(task.sft_rows(0, 80))
    job = job_for(tmp_path, demo_model_dir, train=rows.iloc[:64], evals=rows.iloc[64:], max_steps=4, eval_steps=2)
    job.run()
    logged = [json.loads(line) for line in (job.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_loss" in r] == [2, 4]




def test_sigterm_saves_a_checkpoint_and_resume_gives_identical_losses(tmp_path, demo_model_dir, capsys):
    reference = job_for(tmp_path / "straight", demo_model_dir, max_steps=6)
    reference.run()
    expected = losses(reference.output_dir / "metrics.jsonl")

    job = job_for(tmp_path / "stopped", demo_model_dir, max_steps=6)
    job.extra_callbacks = [signal_at(3)]
    with pytest.raises(TrainingInterrupted) as stop:
        job.run()
    checkpoint = job.checkpoint_dir / "checkpoint-3"
    assert stop.value.checkpoint == checkpoint and checkpoint.is_dir()
    assert stop.value.render() == (f"Training interrupted. Checkpoint saved to: {checkpoint}\n"
                                   f"Resume with: lexalign finetune --config <config> --resume {checkpoint}")
    assert not job.output_dir.exists(), "an interrupted run must not leave an output that looks complete"

    job.extra_callbacks = []
    job.run()  # no --resume: the newest checkpoint made with this config is found
    assert "Resuming from" in capsys.readouterr().out
    resumed = losses(job.output_dir / "metrics.jsonl")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"
    final, straight = weights(job.output_dir), weights(reference.output_dir)
    assert all(torch.allclose(final[k], straight[k], atol=1e-6) for k in final)


def test_a_checkpoint_of_another_config_is_never_resumed(tmp_path, demo_model_dir, capsys):
    job = job_for(tmp_path, demo_model_dir, max_steps=4)
    job.extra_callbacks = [signal_at(2)]
    with pytest.raises(TrainingInterrupted):
        job.run()
    changed = job_for(tmp_path, demo_model_dir, max_steps=4, learning_rate=1e-3)
    changed.run()
    err = capsys.readouterr().err
    assert "made with a different config. Starting fresh." in err
    assert sorted(losses(changed.output_dir / "metrics.jsonl"))[0] == 1


def test_a_half_written_checkpoint_is_skipped(tmp_path, demo_model_dir, capsys):
    job = job_for(tmp_path, demo_model_dir, max_steps=2)
    (job.checkpoint_dir / "checkpoint-9").mkdir(parents=True)  # killed while saving: no trainer_state.json
    job.run()
    assert "Skipping incomplete checkpoint" in capsys.readouterr().err


class RaiseAt(TrainerCallback):
    def __init__(self, error: BaseException):
        self.error = error

    def on_step_begin(self, args, state, control, **kwargs):
        raise self.error


def test_out_of_memory_says_what_to_try(tmp_path, demo_model_dir):
    job = job_for(tmp_path, demo_model_dir, batch_size=16, gradient_accumulation_steps=2)
    job.extra_callbacks = [RaiseAt(MemoryError())]
    with pytest.raises(LexAlignError) as err:
        job.run()
    assert err.value.render() == (
        "Error: CPU out of memory\n→ Try: reducing batch_size (now 16), enabling use_lora, "
        "or raising gradient_accumulation_steps (now 2)"
    )


def test_missing_model_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(LexAlignError) as err:
        job_for(tmp_path, tmp_path / "nothing").run()
    assert err.value.render().startswith(f'Error: Model not found at "{tmp_path / "nothing"}"\n→ Run: lexalign ')


def test_tensorboard_logs_when_enabled(tmp_path, demo_model_dir):
    job = job_for(tmp_path, demo_model_dir, max_steps=2, tensorboard=True)
    job.run()
    events = list((job.checkpoint_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
