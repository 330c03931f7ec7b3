"""Padding-free batches: packed sequences score exactly as each one alone, on real architectures."""

from __future__ import annotations

import random

import pytest
import torch

from lexalign.models import packing

FAMILIES = ["llama3", "qwen2", "gemma", "gpt2", "phi3", "gpt_neox"]


def _model(zoo_models, family):
    from trl.trainer.utils import add_fused_lm_head

    from lexalign.models.loading import load_causal_lm

    model = load_causal_lm(zoo_models(family), "cpu").eval()
    add_fused_lm_head(model)
    return model


def _sequences(vocab: int, seed: int = 0, n: int = 7):
    rng = random.Random(seed)
    seqs = [[rng.randrange(5, min(vocab, 600)) for _ in range(rng.randint(4, 48))] for _ in range(n)]
    return seqs, [rng.randint(1, len(s) - 1) for s in seqs]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_log_probs_equal_each_sequence_alone(zoo_models, family):
    """Token by token: attention stays within each packed sequence (position_ids restart at 0)."""
    model = _model(zoo_models, family)
    seqs, starts = _sequences(model.config.vocab_size)
    packed = packing.pack(seqs, starts)
    with torch.no_grad():
        together = model(input_ids=packed.input_ids, position_ids=packed.position_ids, labels=packed.labels,
                         use_cache=False, fused_lm_head=True).log_probs[0]
        offset = 0
        for seq, start in zip(seqs, starts, strict=True):
            ids = torch.tensor([seq])
            labels = ids.clone()
            labels[0, :start] = -100
            alone = model(input_ids=ids, labels=labels, use_cache=False, fused_lm_head=True).log_probs[0]
            # Position t scores token t + 1; the packed row also scores across the boundary: never (-100).
            got = together[offset:offset + len(seq) - 1]
            assert torch.allclose(got, alone, atol=1e-5), (family, (got - alone).abs().max())
            if offset:
                assert together[offset - 1] == 0  # the token before a sequence never scores its first token
            offset += len(seq)
        sums = packing.packed_logps(model, packed)
    assert len(sums) == len(seqs)


def test_the_gradients_of_packed_and_padded_batches_are_equal(zoo_models):
    model = _model(zoo_models, "qwen2")
    seqs, starts = _sequences(model.config.vocab_size, seed=1, n=4)
    model.zero_grad()
    packing.packed_logps(model, packing.pack(seqs, starts)).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
        labels[row, start:len(seq)] = torch.tensor(seq[start:])
    model(input_ids=ids, attention_mask=attention, labels=labels, use_cache=False,
          fused_lm_head=True).log_probs.sum().backward()
    for name, grad in packed_grads.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-5), name


def test_budget_batches_hold_every_index_once_within_the_budget():
    lengths = [5, 300, 17, 64, 64, 1, 900, 33]
    batches = packing.budget_batches(lengths, budget=400)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert sum(lengths[i] for i in batch) <= 400 or len(batch) == 1


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_the_reference_step_packed_equals_padded(zoo_models, family):
    """lexalign.reference.scoring.group_logps: packed batches give the log-probs of the trainers' padded collator
    (response-major, right padded, max_length cuts), scored in one padded batch here."""
    import pyarrow as pa

    from lexalign.reference.scoring import group_logps
    from lexalign.train.ranked_trainer import DataCollatorForRankedPreference

    model = _model(zoo_models, family)
    rng = random.Random(2)
    prompts = [[rng.randrange(5, 600) for _ in range(rng.randint(2, 20))] for _ in range(5)]
    completions = [[[rng.randrange(5, 600) for _ in range(rng.randint(1, 30))] for _ in range(2)] for _ in range(5)]
    ids = pa.list_(pa.int32())
    table = pa.table({"prompt_ids": pa.array(prompts, type=ids), "completion_ids": pa.array(completions,
                                                                                           type=pa.list_(ids))})
    packed = group_logps(model, table, max_length=32, token_budget=64)
    batch = DataCollatorForRankedPreference(pad_token_id=0, max_length=32, truncation_mode="keep_start")(
        [{**row, "scores": [0.0, 0.0]} for row in table.to_pylist()])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.inference_mode():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    use_cache=False, fused_lm_head=True)
    padded = out.log_probs[:, -(batch["completion_mask"].size(1) - 1):].sum(dim=1).view(2, 5).T
    assert [v for row in packed for v in row] == pytest.approx(padded.flatten().tolist(), abs=1e-4)
