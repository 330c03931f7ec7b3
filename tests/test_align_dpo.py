"""DPO for real on the tiny SFT model: the reference is the SFT policy, every TRL loss, LoRA/QLoRA/full."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from lexalign.config.loader import section_defaults
from lexalign.config.sections import AlignConfig
from lexalign.demo import task
from lexalign.methods import DPO_LOSS_TYPES
from lexalign.train.align import AlignJob, dpo_arguments

LOG2 = math.log(2)


def pairs(n: int = 48) -> pd.DataFrame:
    frame = pd.DataFrame(task.preference_rows(0, n))
    frame["source_row"] = range(1, n + 1)
    return frame


def job_for(tmp_path: Path, model: Path, **params) -> AlignJob:
    params = {"learning_rate": 1e-3, "batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 2,
              "warmup_steps": 0, "max_length": 64, "save_steps": 1000, "logging_steps": 1, "lora_dropout": 0.0,
              "beta": 0.1, **params}
    train = pairs()
    return AlignJob(
        model_path=model,
        train=train,
        eval=train.iloc[:0],
        cfg=AlignConfig.from_dict(section_defaults("alignment", params)),
        output_dir=tmp_path / "aligned",
        checkpoint_dir=tmp_path / "checkpoints",
        device="cpu",
        seed=3,
    )


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_align_config_maps_to_trl_dpo_config(tmp_path):
    job = job_for(tmp_path, tmp_path, batch_size=4, gradient_accumulation_steps=4, num_epochs=3, warmup_steps=100,
                  weight_decay=0.01, save_steps=500, max_steps=None, beta=0.2, loss_type=["sigmoid", "sft"],
                  loss_weights=[1.0, 0.5], label_smoothing=0.0, learning_rate="1e-5")
    args = dpo_arguments(job, "cpu", has_eval=False)
    assert args["per_device_train_batch_size"] == 4 and args["gradient_accumulation_steps"] == 4
    assert args["num_train_epochs"] == 3 and args["max_steps"] == -1
    assert args["warmup_steps"] == 100 and args["weight_decay"] == 0.01 and args["save_steps"] == 500
    assert args["learning_rate"] == 1e-5 and args["beta"] == 0.2
    assert args["loss_type"] == ["sigmoid", "sft"] and args["loss_weights"] == [1.0, 0.5]
    assert args["max_length"] == 64 and args["use_cpu"] and not args["bf16"]
    from trl import DPOConfig

    DPOConfig(**args)  # TRL accepts every key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_reference_is_the_sft_model_loss_starts_at_log2(tmp_path, sft_model_dir, method):
    params = {"use_lora": method != "full", "load_in_4bit": method == "qlora", "max_steps": 3}
    if method == "full":
        params["learning_rate"] = 1e-4
    before = AutoModelForCausalLM.from_pretrained(sft_model_dir).state_dict()
    out = job_for(tmp_path, sft_model_dir, **params).run()
    first = logged(out)[0]
    assert first["step"] == 1
    # Policy and reference are the same SFT weights before the first update.
    assert first["loss"] == pytest.approx(LOG2, abs=1e-4)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.allclose(before[k], after[k]) for k in before), "parameters did not change"
    assert logged(out)[-2]["rewards/margins"] > 0, "three steps should already prefer the chosen answers"


@pytest.mark.slow
def test_an_sft_adapter_is_merged_so_the_reference_is_not_the_base(tmp_path, demo_model_dir):
    """SFT saved as an adapter alone: the reference must be base+adapter, not the base."""
    from lexalign.config.sections import FinetuneConfig
    from lexalign.train.finetune import FinetuneJob

    sft = FinetuneJob(
        model_path=demo_model_dir,
        train=pd.DataFrame(task.sft_rows(0, 160)),
        eval=pd.DataFrame(columns=["prompt", "completion"]),
        cfg=FinetuneConfig.from_dict(section_defaults("finetune", {
            "learning_rate": 3e-3, "batch_size": 16, "max_steps": 10, "max_length": 64, "merge": False})),
        output_dir=tmp_path / "sft-adapter",
        checkpoint_dir=tmp_path / "sft-ckpt",
        device="cpu",
    ).run()
    assert (sft / "adapter_config.json").is_file() and not (sft / "config.json").is_file()
    out = job_for(tmp_path, sft, max_steps=1).run()
    assert logged(out)[0]["loss"] == pytest.approx(LOG2, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_trl_loss_type_trains(tmp_path, sft_model_dir, loss_type):
    params = {"loss_type": loss_type, "max_steps": 1}
    if loss_type in ("robust", "exo_pair"):
        params["label_smoothing"] = 0.1
    job = job_for(tmp_path, sft_model_dir, **params)
    trainer, _, interrupt = job.setup()
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
def test_a_weighted_mixture_adds_its_terms(tmp_path, sft_model_dir):
    job = job_for(tmp_path, sft_model_dir, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], max_steps=1)
    out = job.run()
    first = logged(out)[0]
    # At step 0 the sigmoid term is log 2; the SFT (NLL) term adds a positive amount.
    assert first["loss"] > LOG2 + 0.01


@pytest.mark.parametrize("family", ["llama3", "gemma"])  # untied and tied embeddings
def test_a_trained_adapter_merged_in_place_writes_what_merging_into_the_reloaded_base_writes(tmp_path, zoo_models,
                                                                                             family):
    """The job's save merges a float32 CPU adapter into the model in memory (no second copy of the weights, the
    job's memory peak before): the files must be byte for byte those of the adapter merged into the base reloaded
    from disk (the route a 4-bit or bf16 base still takes)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    from lexalign.models.loading import load_causal_lm, load_tokenizer, merged_model
    from lexalign.train.runtime import merges_in_place, save_trained_model

    base = zoo_models(family)
    model = get_peft_model(load_causal_lm(base, "cpu"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "adapter")
    expected = merged_model(tmp_path / "adapter", base)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True,
                                                          report_to=[]))
    assert merges_in_place(model)
    (tmp_path / "out").mkdir()
    save_trained_model(trainer, load_tokenizer(base), tmp_path / "out", adapter=True, merge=True, base_path=base)

    written = load_file(tmp_path / "out" / "model.safetensors")
    wanted = {k: v for k, v in expected.state_dict().items() if k in written}
    assert sorted(written) == sorted(wanted) and all(torch.equal(written[k], wanted[k]) for k in written)
    assert any(not torch.equal(v, load_file(base / "model.safetensors").get(k, v)) for k, v in written.items()), \
        "the adapter changed nothing"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not any("lora" in k for k in reloaded.state_dict())
    assert not merges_in_place(get_peft_model(load_causal_lm(base, "cpu").to(torch.bfloat16),
                                              LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
