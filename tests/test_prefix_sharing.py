"""Prompts shared in packed batches (lexalign/models/packing.py): the prompt runs once per group, each response
attends to it and to itself only (attention unit by unit under SDPA, an explicit mask otherwise), and every
response's log-probs (and gradients) are those of prompt + response alone, on real architectures (tiny zoo
models: Llama-3, Qwen2, Gemma-2 with eager attention and soft-capping, GPT-2 with absolute positions, Phi-3,
GPT-NeoX)."""

from __future__ import annotations

import random

import pytest
import torch

from lexalign.models import packing

FAMILIES = ["llama3", "qwen2", "gemma", "gpt2", "phi3", "gpt_neox"]


def _model(zoo_models, family, train=False):
    from lexalign.models.loading import load_causal_lm
    from lexalign.models.logprobs import DEFAULT_OUTPUTS, add_lean_lm_head

    model = load_causal_lm(zoo_models(family), "cpu", train_all_weights=train).eval()  # no dropout: comparable
    add_lean_lm_head(model, DEFAULT_OUTPUTS)
    return model


def _groups(vocab: int, seed: int, groups: int = 4, k: int = 2):
    """Prompts with K responses each, flattened group-major, and where each response starts."""
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(5, min(vocab, 600)) for _ in range(n)]  # noqa: E731
    sequences, starts = [], []
    for _ in range(groups):
        prompt = draw(rng.randint(2, 20))
        for _ in range(k):
            sequences.append(prompt + draw(rng.randint(1, 30)))
            starts.append(len(prompt))
    sequences.append(draw(9))  # a sequence of its own, scored from its first token on
    starts.append(0)
    return sequences, starts


def test_shared_units_group_the_sequences_of_one_prompt():
    sequences = [[1, 2, 3, 4], [1, 2, 3, 9, 9], [5, 6, 7], [1, 7, 8, 4], [1, 2, 3, 5], [1, 2, 6, 6]]
    starts = [3, 3, 2, 3, 3, 3]
    # [1, 2] is what 0, 1, 4 and 5 share (a prompt but its last token: 5's prompt [1, 2, 6] shares it too); 3's
    # prompt differs before its last token.
    assert packing.shared_units(sequences[:5], starts[:5]) == [[0, 1, 4], [2], [3]]
    assert packing.shared_units(sequences, starts) == [[0, 1, 4, 5], [2], [3]]
    sequences, starts = sequences[:5], starts[:5]
    assert packing.shared_units(sequences, [1, 1, 1, 1, 1]) == [[0], [1], [2], [3], [4]]  # nothing to share
    packed = packing.pack(sequences, starts, share_prefixes=True)
    # [1, 2] once, then each response's segment from the prompt's last token: 2 + 2 + 3 + 2 | 3 | 4.
    assert packed.input_ids[0].tolist() == [1, 2, 3, 4, 3, 9, 9, 3, 5, 5, 6, 7, 1, 7, 8, 4]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 2, 3, 4, 2, 3, 0, 1, 2, 0, 1, 2, 3]
    assert packed.labels[0].tolist() == [-100, -100, -100, 4, -100, 9, 9, -100, 5, -100, -100, 7, -100, -100, -100, 4]
    allowed = packed.allowed[0]
    assert allowed[5].tolist()[:7] == [True, True, False, False, True, True, False]  # prompt, own segment only
    assert not allowed[9, :9].any() and allowed[11, 9:12].all()  # a unit of its own sees nothing before it


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompts_give_each_response_its_log_probs_alone(zoo_models, family):
    """Token by token and summed, DPO's pairs and GDPO's groups of 3: as each sequence run alone."""
    model = _model(zoo_models, family)
    for k in (2, 3):
        sequences, starts = _groups(model.config.vocab_size, seed=FAMILIES.index(family) + k, k=k)
        shared = packing.pack(sequences, starts, share_prefixes=True)
        plain = packing.pack(sequences, starts)
        assert shared.allowed is not None and shared.input_ids.shape[1] < plain.input_ids.shape[1]
        with torch.no_grad():
            alone = []
            for seq, start in zip(sequences, starts, strict=True):
                ids = torch.tensor([seq])
                labels = ids.clone()
                labels[0, :max(start, 1)] = -100
                alone.append(model(input_ids=ids, labels=labels, use_cache=False, fused_lm_head=True).log_probs[0])
            together = packing.packed_logps(model, shared)
            # Under SDPA the attention ran unit by unit, once per layer; under eager, by the mask.
            layers = model.config.get_text_config().num_hidden_layers
            assert shared.spans.calls == (layers if model.config._attn_implementation != "eager" else 0), family
            # Every scored token's log-prob, found in the shared row by its sequence and token index: unit by unit,
            # and by the explicit mask alone (what an attention that does not take the units gets).
            runs = {"units": packing.packed_forward_kwargs(model, shared.allowed, shared.spans),
                    "mask": {"attention_mask": packing.attention_mask(model, shared.allowed)}}
            per_token = {how: model(input_ids=shared.input_ids, position_ids=shared.position_ids,
                                    labels=shared.labels, use_cache=False, fused_lm_head=True, **extra).log_probs[0]
                         for how, extra in runs.items()}
        scored = shared.labels[0, 1:] != -100
        owners = shared.sequence[1:][scored].tolist()
        for how, values_of_run in per_token.items():
            got = values_of_run[scored]
            for i, values in enumerate(alone):
                expected = values[values != 0]
                mine = got[[o == i for o in owners]]
                assert torch.allclose(mine, expected, atol=1e-5), (family, how, k, i, (mine - expected).abs().max())
        sums = torch.stack([values.sum() for values in alone])
        assert torch.allclose(together, sums, atol=1e-4), (family, k)


@pytest.mark.parametrize(("family", "row_tokens"), [("llama3", None), ("llama3", 4096), ("qwen2", 4096),
                                                   ("gemma", None), ("gpt2", 4096)])
def test_shared_training_rows_have_the_padded_log_probs_and_gradients(zoo_models, family, row_tokens):
    """pack_rows with shared prompts, a right-padded batch as TRL's collators build it (chosen rows, then
    rejected rows): the per-token outputs unpack to the padded batch's, and the gradients are equal; rows as wide
    as the longest unit, or (`row_tokens`, attention unit by unit) one row with no padding."""
    model = _model(zoo_models, family, train=True)
    sequences, starts = _groups(model.config.vocab_size, seed=7, groups=3)
    sequences, starts = sequences[:-1], starts[:-1]
    order = [i for i in range(0, len(sequences), 2)] + [i for i in range(1, len(sequences), 2)]  # chosen, rejected
    sequences, starts = [sequences[i] for i in order], [starts[i] for i in order]
    width = max(map(len, sequences)) + 2
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
        completion[row, start:len(seq)] = 1
    labels = ids.masked_fill(completion == 0, -100)
    model.zero_grad()
    padded = model(input_ids=ids, attention_mask=attention, labels=labels, use_cache=False, fused_lm_head=True)
    (padded.log_probs.sum(dim=1) * torch.linspace(1, 2, len(sequences))).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    rows = packing.pack_rows(ids, attention, completion, share_prefixes=True, row_tokens=row_tokens)
    assert rows.allowed is not None and rows.input_ids.numel() < attention.sum()  # fewer tokens than the sequences
    if row_tokens:
        assert rows.input_ids.shape[0] == 1 and (rows.labels != -100).sum() == (labels[:, 1:] != -100).sum()
    out = model(input_ids=rows.input_ids, position_ids=rows.position_ids, labels=rows.labels, use_cache=False,
                fused_lm_head=True, **packing.packed_forward_kwargs(model, rows.allowed, rows.spans))
    assert rows.spans.calls == (0 if family == "gemma" else model.config.num_hidden_layers)
    log_probs = rows.unpack(out.log_probs)
    assert torch.allclose(log_probs, padded.log_probs.detach(), atol=1e-5), (log_probs - padded.log_probs).abs().max()
    for name in ("entropy", "mean_logits"):
        assert torch.allclose(rows.unpack(getattr(out, name)), getattr(padded, name), atol=1e-4), name
    assert torch.equal(rows.unpack(out.is_top1), padded.is_top1)
    (log_probs.sum(dim=1) * torch.linspace(1, 2, len(sequences))).sum().backward()
    for name, grad in expected.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-5), (family, name)


def test_plans_keep_a_prompts_sequences_together_and_count_its_tokens_once(zoo_models):
    model = _model(zoo_models, "llama3")
    sequences, starts = _groups(model.config.vocab_size, seed=3, groups=6, k=3)
    lengths = [len(s) for s in sequences]
    batches = packing.plan_batches(model, lengths, token_budget=60, sequences=sequences, starts=starts)
    assert sorted(i for b in batches for i in b) == list(range(len(sequences)))
    for group in range(6):
        members = {3 * group + k for k in range(3)}
        assert sum(1 for b in batches if members & set(b)) == 1  # one batch holds the whole group
    for batch in batches:
        units = packing.shared_units([sequences[i] for i in batch], [starts[i] for i in batch])
        size = sum(packing.unit_length([lengths[batch[i]] for i in u],
                                       packing.prefix_cut(starts[batch[u[0]]]) if len(u) > 1 else 0) for u in units)
        assert size <= 60 or len(units) == 1
    # Scored with shared prompts, planned so: each sequence's sum as it is alone, to float rounding.
    shared = packing.sequence_logps(model, sequences, starts)
    alone = packing.sequence_logps(model, sequences, starts, share_prefixes=False)
    assert shared == pytest.approx(alone, abs=1e-4)


def test_a_binding_sliding_window_or_flash_attention_shares_nothing(zoo_models):
    model = _model(zoo_models, "llama3")
    assert packing.unit_shareable(model, [50])
    model.config.sliding_window = 32
    assert packing.unit_shareable(model, [32]) and not packing.unit_shareable(model, [33])
    model.config.sliding_window = None
    model.config._attn_implementation = "flash_attention_2"
    assert packing.sharing_mask_kind(model) is None and not packing.unit_shareable(model, [5])


def test_the_ranked_trainers_online_reference_pass_is_packed_with_shared_prompts(zoo_models, tmp_path):
    """GDPO without a reference file: its reference pass runs on the batch's packed rows, each prompt once for its
    K responses, and gives the padded pass's log-probs."""
    from datasets import Dataset
    from peft import LoraConfig

    from lexalign.models.loading import load_causal_lm, load_tokenizer
    from lexalign.train.ranked_trainer import RankedConfig, RankedTrainer

    path = zoo_models("llama3")
    rng = random.Random(5)
    draw = lambda k: [rng.randrange(5, 600) for _ in range(k)]  # noqa: E731
    groups = [{"prompt_ids": draw(rng.randint(2, 12)), "completion_ids": [draw(rng.randint(1, 25)) for _ in range(4)],
               "scores": [3.0, 2.0, 1.0, 0.0]} for _ in range(3)]
    trainer = RankedTrainer(model=load_causal_lm(path, "cpu"), processing_class=load_tokenizer(path),
                            args=RankedConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=64,
                                              group_size=4, per_device_train_batch_size=3, disable_tqdm=True),
                            train_dataset=Dataset.from_list(groups),
                            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = trainer.data_collator(groups)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    shapes = []
    hook = trainer.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: shapes.append(tuple(args[0].shape)))
    packed = trainer._reference_logps(kwargs, labels, labels.size(1) - 1, batch)
    padded = trainer._reference_logps(kwargs, labels, labels.size(1) - 1)
    hook.remove()
    assert shapes[0][0] == 1 and shapes[0][1] < batch["attention_mask"].sum()  # one row, each prompt once
    assert torch.allclose(packed, padded, atol=1e-4), (packed - padded).abs().max()
