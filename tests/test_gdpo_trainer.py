"""The GDPO trainer: data layout, reduction to TRL's DPO, real training (LoRA and full), one forward pass."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from lexalign.core.errors import LexAlignError
from lexalign.data.ranking import ranked_groups, select_indices
from lexalign.demo import task
from lexalign.train.ranked_trainer import DataCollatorForRankedPreference, RankedConfig, RankedTrainer, ranked_dataset


def base_args(tmp_path, **overrides) -> dict:
    args = {
        "output_dir": str(tmp_path / "checkpoints"),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-3,
        "max_steps": 3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        # fp32, as LexAlign trains on the CPU (runtime.gpu_defaults). TRL's default, bf16 autocast even on the
        # CPU, rounds the LM head's products to bf16: TRL's kernel recomputes them in bf16 in the backward
        # pass and LexAlign's CPU head in fp32, and the two part at 1e-3 within two updates at lr 1e-2.
        "bf16": False,
        "disable_tqdm": True,
        "max_length": 64,
        "seed": 0,
        "beta": 0.1,
    }
    return {**args, **overrides}


def pairs_frame(n: int = 16) -> pd.DataFrame:
    return pd.DataFrame(task.preference_rows(0, n))


# --- data ---------------------------------------------------------------------------------------------


def test_select_indices_keeps_best_worst_and_evenly_spaced():
    assert select_indices(4, 4) == [0, 1, 2, 3]
    assert select_indices(6, 3) == [0, 3, 5]  # 2.5 rounds up, never collides
    assert select_indices(7, 4) == [0, 2, 4, 6]
    assert select_indices(9, 2) == [0, 8]
    for n in range(2, 30):
        for k in range(2, n + 1):
            picked = select_indices(n, k)
            assert picked[0] == 0 and picked[-1] == n - 1 and len(set(picked)) == k and picked == sorted(picked)


def test_ranked_groups_trims_drops_and_sorts_stably():
    frame = pd.DataFrame([
        {"prompt": "a", "responses": ["a1", "a2", "a3", "a4", "a5", "a6"], "scores": [6, 5, 4, 3, 2, 1]},
        {"prompt": "b", "responses": ["b1", "b2"], "scores": [1, 0]},
        {"prompt": "c", "responses": ["c2", "c1", "c3"], "scores": [1.0, 2.0, 1.0]},
    ])
    rows, dropped = ranked_groups(frame, 3)
    assert dropped == 1
    assert rows[0]["responses"] == ["a1", "a4", "a6"]
    assert rows[0]["scores"] == [6.0, 3.0, 1.0]
    # sorted best first; the tie (c2, c3) keeps its given order
    assert rows[1]["responses"] == ["c1", "c2", "c3"] and rows[1]["scores"] == [2.0, 1.0, 1.0]


def test_pairs_are_groups_of_two():
    frame = pairs_frame(3)
    rows, dropped = ranked_groups(frame, 2)
    assert dropped == 0
    assert [r["responses"] for r in rows] == [[c, r] for c, r in zip(frame["chosen"], frame["rejected"], strict=True)]
    assert all(r["scores"] == [1.0, 0.0] for r in rows)
    with pytest.raises(LexAlignError, match="No train group has 4 ranked responses"):
        ranked_dataset(frame, 4)


def test_demo_ranked_rows():
    rows = task.ranked_rows(0, 50)
    train_prompts = {p for _, p in task.TRAIN_PROMPTS}
    assert len(rows) == 50 and len({(r["prompt"], *r["responses"]) for r in rows}) == 50
    for row in rows:
        assert row["prompt"] in train_prompts
        assert len(row["responses"]) == 4 and row["scores"] == sorted(row["scores"], reverse=True)
        assert len(set(row["scores"])) == 4
        assert [task.judge(r) for r in row["responses"]] == [True, False, False, False]
    assert task.ranked_rows(0, 50) == rows  # deterministic
    two = task.ranked_rows(0, 5, k=2)
    assert all(len(r["responses"]) == 2 and task.judge(r["responses"][0]) for r in two)


def test_collator_at_k2_is_trls_preference_collator():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12]},
    ]
    ranked = [{"prompt_ids": e["prompt_ids"], "completion_ids": [e["chosen_ids"], e["rejected_ids"]],
               "scores": [1.0, 0.0]} for e in examples]
    for max_length, mode in ((None, "keep_start"), (4, "keep_start"), (4, "keep_end")):
        trl_batch = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode=mode)(examples)
        ours = DataCollatorForRankedPreference(pad_token_id=0, max_length=max_length, truncation_mode=mode)(ranked)
        for key in ("input_ids", "attention_mask", "completion_mask"):
            assert torch.equal(ours[key], trl_batch[key]), key
        assert ours["scores"].tolist() == [[1.0, 0.0], [1.0, 0.0]]


def test_collator_lays_out_k_responses_response_major():
    examples = [
        {"prompt_ids": [1], "completion_ids": [[10], [11], [12]], "scores": [3, 2, 1]},
        {"prompt_ids": [2], "completion_ids": [[20], [21], [22]], "scores": [3, 2, 2]},
    ]
    batch = DataCollatorForRankedPreference(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[1, 10], [2, 20], [1, 11], [2, 21], [1, 12], [2, 22]]
    assert batch["scores"].shape == (2, 3)


def test_config_errors_have_the_training_issue_messages():
    from lexalign.config.loader import section_defaults
    from lexalign.config.sections import AlignConfig

    with pytest.raises(LexAlignError, match=r"group_delay_size must be >= 2 \(got: 1\)"):
        AlignConfig.from_dict(section_defaults("alignment", {"method": "gdpo", "group_delay_size": 1}))
    with pytest.raises(LexAlignError, match=r"group_delay_weight must be <= 1 \(got: 1.5\)"):
        AlignConfig.from_dict(section_defaults("alignment", {"method": "gdpo", "group_delay_weight": 1.5}))


# --- reduction to TRL's DPO ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_reference(sft_model_dir, demo_model_dir, tmp_path_factory):
    """TRL's DPOTrainer on the SFT policy against a different reference (so rewards are not zero), one batch."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lexalign.models.loading import load_causal_lm, load_tokenizer

    tmp = tmp_path_factory.mktemp("dpo")
    tokenizer = load_tokenizer(sft_model_dir)
    trainer = DPOTrainer(
        model=load_causal_lm(sft_model_dir, "cpu"),
        ref_model=load_causal_lm(demo_model_dir, "cpu"),
        args=DPOConfig(**base_args(tmp)),
        train_dataset=Dataset.from_pandas(pairs_frame(), preserve_index=False),
        processing_class=tokenizer,
    )
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
    trainer.model.train()  # dropout is off (DPOConfig.disable_dropout); metrics go to "train"
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics, batch


@pytest.mark.slow
@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_k2_loss_equals_trl_dpo_sigmoid_loss(weight, dpo_reference, sft_model_dir, demo_model_dir, tmp_path):
    from lexalign.models.loading import load_causal_lm, load_tokenizer

    dpo_loss, dpo_metrics, dpo_batch = dpo_reference
    trainer = RankedTrainer(
        model=load_causal_lm(sft_model_dir, "cpu"),
        ref_model=load_causal_lm(demo_model_dir, "cpu"),
        args=RankedConfig(**base_args(tmp_path), group_size=2, loss_keys={"group_delay_weight": weight}),
        train_dataset=ranked_dataset(pairs_frame(), 2),
        processing_class=load_tokenizer(sft_model_dir),
    )
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], dpo_batch[key]), key  # the very same batch
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert abs(dpo_loss - math.log(2)) > 0.05  # a non-trivial comparison
    assert loss == pytest.approx(dpo_loss, abs=1e-5)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
                "mean_token_accuracy"):
        assert metrics[key] == pytest.approx(dpo_metrics[key], abs=1e-5), key
    assert metrics["loss/pairwise"] == pytest.approx(dpo_loss, abs=1e-5)
    assert metrics["loss/group"] == pytest.approx(dpo_loss, abs=1e-5)


@pytest.mark.slow
def test_k2_lora_training_follows_trl_dpo_step_for_step(sft_model_dir, tmp_path):
    """Same seed, data and LoRA init: GDPO at K = 2 trains exactly like TRL's DPO, loss by loss."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from lexalign.models.loading import load_causal_lm, load_tokenizer

    def lora():
        return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")

    args = base_args(tmp_path, learning_rate=1e-2, max_steps=4)
    dpo = DPOTrainer(model=load_causal_lm(sft_model_dir, "cpu"), args=DPOConfig(**args),
                     train_dataset=Dataset.from_pandas(pairs_frame(), preserve_index=False),
                     processing_class=load_tokenizer(sft_model_dir), peft_config=lora())
    dpo.train()
    gdpo = RankedTrainer(model=load_causal_lm(sft_model_dir, "cpu"),
                       args=RankedConfig(**args, group_size=2, loss_keys={"group_delay_weight": 0.5}),
                       train_dataset=ranked_dataset(pairs_frame(), 2),
                       processing_class=load_tokenizer(sft_model_dir), peft_config=lora())
    gdpo.train()
    dpo_losses = [r["loss"] for r in dpo.state.log_history if "loss" in r]
    gdpo_losses = [r["loss"] for r in gdpo.state.log_history if "loss" in r]
    assert len(dpo_losses) == 4 and dpo_losses[-1] < dpo_losses[0]
    # Step for step; each update at lr 1e-2 amplifies float32 rounding (the two trainers sum in a different
    # order), so the last step is held to 1e-4 (measured drift 4.9e-5 with TRL 1.16, 0 before the 3rd update).
    assert gdpo_losses[:3] == pytest.approx(dpo_losses[:3], abs=1e-5)
    assert gdpo_losses[3] == pytest.approx(dpo_losses[3], abs=1e-4)


# --- real training through the align step ------------------------------------------------------------


def align_job(tmp_path, sft_model_dir, frame, eval_frame=None, **params):
    from lexalign.config.loader import section_defaults
    from lexalign.config.sections import AlignConfig
    from lexalign.train.align import AlignJob

    values = {"method": "gdpo", "learning_rate": 5e-3, "batch_size": 4, "gradient_accumulation_steps": 1,
              "max_steps": 3, "warmup_steps": 0, "logging_steps": 1, "save_steps": 1000, "max_length": 64,
              "lora_dropout": 0.0, "beta": 0.1, **params}
    return AlignJob(
        model_path=sft_model_dir,
        train=frame,
        eval=eval_frame if eval_frame is not None else pd.DataFrame(columns=["prompt", "responses", "scores"]),
        cfg=AlignConfig.from_dict(section_defaults("alignment", values)),
        output_dir=tmp_path / "aligned",
        checkpoint_dir=tmp_path / "checkpoints",
        device="cpu",
    )


def state_dict(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def first_log(metrics_file) -> dict:
    return next(r for r in map(json.loads, metrics_file.read_text().splitlines()) if "loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_training_k2_starts_at_log2_and_changes_the_model(use_lora, sft_model_dir, tmp_path):
    frame = pd.DataFrame(task.ranked_rows(0, 24, k=2))
    job = align_job(tmp_path, sft_model_dir, frame, use_lora=use_lora, group_delay_size=2)
    out = job.run()
    log = first_log(out / "metrics.jsonl")
    # step 0: the policy is the SFT model, and so is the reference
    assert log["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert log["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert log["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert log["loss/pairwise"] == pytest.approx(math.log(2), abs=1e-5)
    before, after = state_dict(sft_model_dir), state_dict(out)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "training left every parameter unchanged"
    from lexalign.core.lineage import read_lineage

    record = read_lineage(out)
    assert record["stage"] == "align" and record["config"]["method"] == "gdpo"


@pytest.mark.slow
def test_training_k4_logs_listwise_metrics_and_learns(sft_model_dir, tmp_path):
    frame = pd.DataFrame(task.ranked_rows(0, 32))
    eval_frame = pd.DataFrame(task.ranked_rows(1, 8))
    weight = 0.5
    job = align_job(tmp_path, sft_model_dir, frame, eval_frame, group_delay_size=4, group_delay_weight=weight,
                    max_steps=6, eval_steps=6)
    out = job.run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    expected = (1 - weight) * math.log(2) + weight * math.log(24) / 3
    assert train[0]["loss"] == pytest.approx(expected, abs=1e-5)
    assert train[0]["loss/group"] == pytest.approx(math.log(24) / 3, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "rewards/top1_accuracy", "rewards/pair_accuracy", "loss/pairwise", "loss/group"):
        assert key in train[0], key
    assert train[-1]["loss"] < train[0]["loss"]
    evaluation = next(r for r in records if "eval_loss" in r)
    assert -1.0 <= evaluation["eval_kendall_tau"] <= 1.0
    assert evaluation["eval_kendall_tau"] > 0  # the rewards already rank the tiers in the right order


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_one_policy_pass_and_one_reference_pass_per_step(use_lora, sft_model_dir, tmp_path):
    """All K·B sequences go through the backbone twice per step: with grad (policy), without (reference), each
    pass on the same packed rows (each prompt once for its K responses: lexalign.train.packed)."""
    from peft import LoraConfig

    from lexalign.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(sft_model_dir, "cpu")
    calls = []
    trainer = RankedTrainer(
        model=model,
        args=RankedConfig(**base_args(tmp_path, max_steps=1, per_device_train_batch_size=3), group_size=4),
        train_dataset=ranked_dataset(pd.DataFrame(task.ranked_rows(0, 6)), 4),
        processing_class=load_tokenizer(sft_model_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        if use_lora else None,
    )
    backbones = [model.model] + ([] if use_lora else [trainer.ref_model.model])
    for index, backbone in enumerate(backbones):
        backbone.register_forward_pre_hook(
            lambda module, args, kwargs, index=index: calls.append(
                (index, kwargs["input_ids"].shape[0], torch.is_grad_enabled())), with_kwargs=True)
    trainer.train()
    ref_index = 0 if use_lora else 1
    assert [(index, grad) for index, _, grad in calls] == [(0, True), (ref_index, False)]
    assert calls[0][1] == calls[1][1] <= 12  # the same rows; packed, fewer than the 12 sequences


@pytest.mark.slow
def test_checkpoint_and_resume(sft_model_dir, tmp_path):
    """A GDPO checkpoint (RankedConfig, optimizer, data position) resumes where it stopped."""
    frame = pd.DataFrame(task.ranked_rows(0, 16))
    first = align_job(tmp_path, sft_model_dir, frame, max_steps=2, save_steps=1)
    trainer, _, interrupt = first.setup()
    with first.training(trainer, interrupt) as resume:
        trainer.train(resume_from_checkpoint=resume)
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()

    resumed = align_job(tmp_path, sft_model_dir, frame, max_steps=3, save_steps=1)
    resumed.resume = checkpoint
    out = resumed.run()
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3]  # the resumed run trained step 3 only
