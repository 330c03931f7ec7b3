"""The reference step: tokens exactly as TRL makes them, log-probs equal to the online reference,
one model in memory for full fine-tuning, and a step a beta change or a sweep run does not rerun."""

from __future__ import annotations

import gc
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from lexalign.core.errors import LexAlignError
from lexalign.demo import task
from lexalign.reference import cache
from lexalign.reference.keys import read_key
from lexalign.reference.layout import split_groups
from lexalign.reference.scoring import compute_reference, load_reference

TRICKY = [  # tokens merging across the prompt/response boundary, a response already ending with EOS
    {"prompt": "User: Please greet Zoe. ", "chosen": "Hello Zoe!", "rejected": " Go away."},
    {"prompt": "User: Greet Bob.\nAssistant:", "chosen": " Hi Bob<|eos|>", "rejected": "Hi"},
    {"prompt": "User: Greet Bob.\nAssistant", "chosen": ": Hello Bob, welcome!", "rejected": ":"},
]


def pairs(n: int = 24) -> pd.DataFrame:
    return pd.DataFrame(task.preference_rows(0, n) + TRICKY)


def groups(n: int = 16, k: int = 4) -> pd.DataFrame:
    return pd.DataFrame(task.ranked_rows(0, n, k=k))


# --- tokenization -----------------------------------------------------------------------------------


def _trl_tokens(trainer_class, config, tokenizer, dataset):
    """The trainer's own `_prepare_dataset`, on a stand-in for the trainer (it reads `_tokenizer` only)."""
    stub = SimpleNamespace(_tokenizer=tokenizer, _drop_fully_truncated=lambda d, a: d)
    return trainer_class._prepare_dataset(stub, dataset, tokenizer, config, "train")


def test_tokens_are_trl_dpo_tokens(demo_tokenizer, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    frame = pairs()
    config = DPOConfig(output_dir=str(tmp_path), max_length=None, use_cpu=True)
    expected = _trl_tokens(DPOTrainer, config, demo_tokenizer, Dataset.from_pandas(frame, preserve_index=False))
    prompt_ids, completion_ids = cache.tokenize_groups(demo_tokenizer, split_groups(frame, "pairs"))
    assert prompt_ids == expected["prompt_ids"]
    assert [c[0] for c in completion_ids] == expected["chosen_ids"]
    assert [c[1] for c in completion_ids] == expected["rejected_ids"]


def test_tokens_are_gdpo_tokens(demo_tokenizer, tmp_path):
    from lexalign.train.ranked_trainer import RankedConfig, RankedTrainer, ranked_dataset

    frame = groups()
    config = RankedConfig(output_dir=str(tmp_path), max_length=None, group_size=4, use_cpu=True)
    expected = _trl_tokens(RankedTrainer, config, demo_tokenizer, ranked_dataset(frame, 4))
    found = split_groups(frame, "k4")
    prompt_ids, completion_ids = cache.tokenize_groups(demo_tokenizer, found)
    assert prompt_ids == expected["prompt_ids"]
    assert completion_ids == expected["completion_ids"]
    assert found.scores == expected["scores"]


def test_groups_keep_their_rows_and_count_the_dropped():
    frame = pd.DataFrame([
        {"prompt": "a", "responses": ["a1", "a2", "a3", "a4"], "scores": [4, 3, 2, 1]},
        {"prompt": "b", "responses": ["b1", "b2"], "scores": [1, 0]},
        {"prompt": "c", "responses": ["c2", "c1", "c3", "c4"], "scores": [2.0, 3.0, 1.0, 0.0]},
    ])
    found = split_groups(frame, "k4")
    assert found.rows == [0, 2] and found.dropped == 1
    assert found.responses[1] == ["c1", "c2", "c3", "c4"]


def test_parallel_batched_tokens_equal_one_by_one(demo_tokenizer, monkeypatch):
    texts = [row["prompt"] + row["chosen"] for row in task.preference_rows(0, 64)] * 4
    from lexalign.core import tokens

    monkeypatch.setattr(tokens, "PARALLEL_MIN_TEXTS", 1)
    batched = tokens.encode(demo_tokenizer, texts, workers=2, chunk=100)
    assert batched == [demo_tokenizer(text=t, add_special_tokens=False)["input_ids"] for t in texts]


def test_tokens_are_cached_by_content(demo_tokenizer, tmp_path, monkeypatch):
    found = split_groups(pairs(), "pairs")
    table, hit = cache.cached_tokens(demo_tokenizer, "tok", found, tmp_path / "cache")
    assert not hit and len(list((tmp_path / "cache").glob("*.parquet"))) == 1
    assert table.column("prompt_ids").to_pylist() == cache.tokenize_groups(demo_tokenizer, found)[0]

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as patch:
        patch.setattr(cache, "tokenize_groups", fail)
        again, hit = cache.cached_tokens(demo_tokenizer, "tok", found, tmp_path / "cache")
    assert hit and again.equals(table)
    # Other texts, or another tokenizer: a new entry.
    assert not cache.cached_tokens(demo_tokenizer, "other", found, tmp_path / "cache")[1]
    changed = split_groups(pairs().assign(chosen=lambda f: f.chosen + "!"), "pairs")
    assert not cache.cached_tokens(demo_tokenizer, "tok", changed, tmp_path / "cache")[1]
    assert len(list((tmp_path / "cache").glob("*.parquet"))) == 3


def test_tokens_in_chunks_equal_tokens_at_once(demo_tokenizer):
    found = split_groups(pairs(), "pairs")
    table = cache.token_table(demo_tokenizer, found, chunk=5)
    prompt_ids, completion_ids = cache.tokenize_groups(demo_tokenizer, found)
    assert table.column("prompt_ids").to_pylist() == prompt_ids
    assert table.column("completion_ids").to_pylist() == completion_ids


# --- the reference file ------------------------------------------------------------------------------


def align_job(tmp_path: Path, model: Path, train: pd.DataFrame, ref: Path | None = None, **params):
    from lexalign.config.loader import section_defaults
    from lexalign.config.sections import AlignConfig
    from lexalign.train.align import AlignJob

    values = {"learning_rate": 5e-3, "batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 3,
              "warmup_steps": 0, "max_length": 64, "save_steps": 1000, "logging_steps": 1, "lora_dropout": 0.0,
              "beta": 0.1, **params}
    name = "precomputed" if ref else "online"
    return AlignJob(
        model_path=model,
        train=train,
        eval=train.iloc[:6],
        cfg=AlignConfig.from_dict(section_defaults("alignment", values)),
        output_dir=tmp_path / name / "aligned",
        checkpoint_dir=tmp_path / name / "checkpoints",
        device="cpu",
        seed=3,
        reference_path=ref,
    )


def compute(tmp_path: Path, model: Path, frame: pd.DataFrame, layout: str, max_length: int = 64) -> Path:
    out = tmp_path / "reference" / f"{layout}.parquet"
    compute_reference(model, frame, frame.iloc[:6], out, layout=layout, max_length=max_length,
                                cache_dir=tmp_path / "cache")
    return out


def test_file_holds_every_group_and_its_key(demo_model_dir, tmp_path):
    frame = groups(12)
    out = compute(tmp_path, demo_model_dir, frame, "k4")
    tables = load_reference(out)
    assert tables["train"].num_rows == 12 and tables["eval"].num_rows == 6
    assert tables["train"].column("row").to_pylist() == list(range(12))
    assert all(len(v) == 4 and all(x < 0 for x in v) for v in tables["train"].column("ref_logps").to_pylist())
    key = read_key(out)
    assert key["layout"] == "k4" and key["max_length"] == 64 and key["truncation_mode"] == "keep_start"
    assert set(key) >= {"model", "tokenizer", "data", "dtype", "key"}


@pytest.mark.parametrize("change, named", [
    ({"max_length": 48}, "max_length"),
    ({"train": "other"}, "the preference data"),
    ({"method": "gdpo", "group_delay_size": 2}, "the method"),
])
def test_a_file_for_other_inputs_is_refused(demo_model_dir, tmp_path, change, named):
    frame = pairs()
    out = compute(tmp_path, demo_model_dir, frame, "pairs")
    params = {k: v for k, v in change.items() if k != "train"}
    train = frame.iloc[2:] if change.get("train") else frame
    job = align_job(tmp_path, demo_model_dir, train, out, **params)
    with pytest.raises(LexAlignError, match="were computed for other inputs") as err:
        job.setup()
    assert named in err.value.render()


def test_a_missing_file_is_named(demo_model_dir, tmp_path):
    job = align_job(tmp_path, demo_model_dir, pairs(), tmp_path / "nowhere.parquet")
    with pytest.raises(LexAlignError, match="Reference log-probs not found"):
        job.setup()


# --- equal to the online reference -------------------------------------------------------------------


def losses(job) -> list[dict]:
    out = job.run()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def models_in_memory() -> int:
    """Causal LMs alive in this process (their backbones, also PreTrainedModels, are not counted)."""
    from transformers import GenerationMixin, PreTrainedModel

    gc.collect()
    return sum(isinstance(o, PreTrainedModel) and isinstance(o, GenerationMixin) for o in gc.get_objects())


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_dpo_precomputed_equals_online(sft_model_dir, tmp_path, use_lora):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lexalign.models.loading import load_causal_lm, load_tokenizer

    frame = pairs()
    out = compute(tmp_path, sft_model_dir, frame, "pairs")
    train = load_reference(out)["train"]
    # TRL's own reference pass over the same data gives the same values.
    trl = DPOTrainer(model=load_causal_lm(sft_model_dir, "cpu"), processing_class=load_tokenizer(sft_model_dir),
                     args=DPOConfig(output_dir=str(tmp_path / "trl"), max_length=64, precompute_ref_log_probs=True,
                                    per_device_train_batch_size=4, use_cpu=True, bf16=False, report_to=[]),
                     train_dataset=Dataset.from_pandas(frame, preserve_index=False))
    ours = torch.tensor(train.column("ref_logps").to_pylist())
    theirs = torch.tensor([trl.train_dataset["ref_chosen_logps"], trl.train_dataset["ref_rejected_logps"]]).T
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    del trl

    lr = 5e-3 if use_lora else 1e-4
    online = align_job(tmp_path, sft_model_dir, frame, use_lora=use_lora, learning_rate=lr)
    precomputed = align_job(tmp_path, sft_model_dir, frame, out, use_lora=use_lora, learning_rate=lr)
    before = models_in_memory()
    trainer, _, _ = precomputed.setup()
    assert trainer.args.precompute_ref_log_probs and trainer.ref_model is None
    if not use_lora:  # full fine-tuning: the policy alone, no reference model (online holds two)
        assert models_in_memory() - before == 1
        del trainer
        online_trainer, _, _ = online.setup()
        assert online_trainer.ref_model is not None and models_in_memory() - before == 2
        del online_trainer
    else:
        del trainer
    a, b = losses(online), losses(precomputed)
    assert len(a) == len(b) == 3 and a[-1]["loss"] != pytest.approx(math.log(2), abs=1e-3)
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert y[key] == pytest.approx(x[key], abs=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_gdpo_k4_precomputed_equals_online(sft_model_dir, tmp_path, use_lora):
    from lexalign.models.loading import load_causal_lm, load_tokenizer
    from lexalign.train.ranked_trainer import RankedConfig, RankedTrainer, ranked_dataset

    frame = groups(16)
    out = compute(tmp_path, sft_model_dir, frame, "k4")
    ours = torch.tensor(load_reference(out)["train"].column("ref_logps").to_pylist())
    # The online reference pass of GDPO's trainer, batch by batch.
    gdpo = RankedTrainer(model=load_causal_lm(sft_model_dir, "cpu"), processing_class=load_tokenizer(sft_model_dir),
                       args=RankedConfig(output_dir=str(tmp_path / "gdpo"), max_length=64, group_size=4,
                                       use_cpu=True, bf16=False, report_to=[]),
                       train_dataset=ranked_dataset(frame, 4))
    online = []
    for start in range(0, 16, 4):
        batch = gdpo.data_collator([gdpo.train_dataset[i] for i in range(start, start + 4)])
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        online.append(gdpo._reference_logps(kwargs, labels, labels.size(1) - 1).view(4, 4).T)
    assert torch.allclose(ours, torch.cat(online), atol=1e-4)
    # And GDPO's own precompute_ref_log_probs (no file) agrees.
    precompute = RankedTrainer(model=load_causal_lm(sft_model_dir, "cpu"),
                               processing_class=load_tokenizer(sft_model_dir),
                               args=RankedConfig(output_dir=str(tmp_path / "gdpo"), max_length=64, group_size=4,
                                                 use_cpu=True, bf16=False, report_to=[], precompute_ref_log_probs=True),
                               train_dataset=ranked_dataset(frame, 4))
    assert torch.allclose(ours, torch.tensor(precompute.train_dataset["ref_logps"]), atol=1e-4)
    del gdpo, precompute

    lr = 5e-3 if use_lora else 1e-4
    params = {"method": "gdpo", "group_delay_size": 4, "use_lora": use_lora, "learning_rate": lr}
    online_job = align_job(tmp_path, sft_model_dir, frame, **params)
    precomputed_job = align_job(tmp_path, sft_model_dir, frame, out, **params)
    before = models_in_memory()
    trainer, _, _ = precomputed_job.setup()
    assert trainer.ref_model is None
    if not use_lora:
        assert models_in_memory() - before == 1
    del trainer
    a, b = losses(online_job), losses(precomputed_job)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        # (Not the accuracies: at step 1 every reward is 0 online and ~1e-7 precomputed, a tie either way.)
        # Relative 1e-4 besides 1e-5: after three LoRA steps at lr 5e-3 the fp32 sums of the packed reference
        # pass and the trainer's padded one were seen 1.1e-5 apart on rewards of ~0.41 (2.6e-5 relative); a wrong
        # reference shifts every reward by its whole log-prob error times beta.
        for key in ("loss", "loss/group", "loss/pairwise", "rewards/chosen", "rewards/margins"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), key


# --- the pipeline ------------------------------------------------------------------------------------


def test_gdpo_reads_the_reference_of_its_k_groups(tmp_path):
    from workflow import copy_workflow, edit_config, planned_jobs, snakemake

    workdir = copy_workflow(tmp_path)
    edit_config(workdir, "alignment", "method", "gdpo")
    result = snakemake(workdir, "-n", "--cores", "1", "results/aligned")
    assert result.returncode == 0, result.stderr[-2000:]
    assert planned_jobs(result.stdout)["reference"] == 1
    assert "results/reference/preferences-k4/k4-max64.parquet" in result.stdout


@pytest.mark.slow
def test_align_reads_the_reference_file(demo_run):
    assert (demo_run / "results/reference/preferences/pairs-max64.parquet").is_file()
    assert "Reference log-probs: results/reference/preferences/pairs-max64.parquet" in \
        (demo_run / "logs/align.log").read_text()
    assert list((demo_run / "results/cache/tokens").glob("*.parquet"))


@pytest.mark.slow
@pytest.mark.parametrize("section, key, value, target, expected", [
    ("alignment", "beta", 0.3, "results/aligned", {"align": 1}),
    ("alignment", "loss_type", "ipo", "results/aligned", {"align": 1}),
    ("runs", "beta-0.5", {"beta": 0.5, "loss_type": "hinge"}, "results/runs/beta-0.5/model", {"align_run": 1}),
    # A new SFT model is a new reference (its tokens come from the cache).
    ("finetune", "learning_rate", 1e-3, "results/aligned", {"finetune": 1, "reference": 1, "align": 1}),
])
def test_what_reruns_the_reference_step(demo_run, tmp_path, section, key, value, target, expected):
    from workflow import edit_config, planned_jobs, snakemake

    workdir = tmp_path / "copy"
    shutil.copytree(demo_run, workdir, symlinks=True)
    edit_config(workdir, section, key, value)
    result = snakemake(workdir, "-n", "--cores", "1", target)
    assert result.returncode == 0, result.stderr[-2000:]
    assert planned_jobs(result.stdout) == expected


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_a_tokenizer_saved_again_by_transformers_has_the_same_key_and_a_changed_one_does_not(tmp_path, zoo_models,
                                                                                            family):
    """Each round's model folder holds its tokenizer as transformers saves it again (5.x adds loader bookkeeping,
    "is_local" and "local_files_only", to tokenizer_config.json). With `online.reference: sft`, round 2 aligns from
    round 1's model against reference log-probs keyed by the SFT model's tokenizer: the same tokenizer, so the same
    key (this refused every second round of SmolLM2's rounds before). What does tokenize differently still counts."""
    from lexalign.models.loading import load_tokenizer
    from lexalign.reference.keys import tokenizer_hash

    base = zoo_models(family)
    tokenizer = load_tokenizer(base)
    tokenizer.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text()) != \
        json.loads((base / "tokenizer_config.json").read_text()), "transformers saved the same config: nothing tested"
    assert tokenizer_hash(tmp_path / "again") == tokenizer_hash(base)

    load_tokenizer(tmp_path / "again").save_pretrained(tmp_path / "twice")
    assert tokenizer_hash(tmp_path / "twice") == tokenizer_hash(base)
    tokenizer.add_tokens(["<lexalign_new_token>"])
    tokenizer.save_pretrained(tmp_path / "grown")
    assert tokenizer_hash(tmp_path / "grown") != tokenizer_hash(base)
    edited = load_tokenizer(base)
    edited.chat_template = "{{ messages[0]['content'] }}"
    edited.save_pretrained(tmp_path / "templated")
    assert tokenizer_hash(tmp_path / "templated") != tokenizer_hash(base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    shutil.copytree(base, tmp_path / "cased", ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "cased" / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 7}))
    assert tokenizer_hash(tmp_path / "cased") != tokenizer_hash(base)
    (tmp_path / "cased" / "chat_template.json").write_text("{not json")  # keyed, not a traceback
    assert tokenizer_hash(tmp_path / "cased") != tokenizer_hash(base)
