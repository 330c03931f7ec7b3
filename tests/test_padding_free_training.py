"""Padding-free training and the lean LM head: the same losses and gradients as the padded computation.

DPO, GDPO and the reference-free trainers run the policy on packed rows (lexalign/train/packed.py) and take
log-probs from the lean head (lexalign/models/logprobs.py). Both must be invisible in the numbers: on real
architectures (Llama-3, Qwen2, Gemma-2 with its logit soft-capping, GPT-2 with absolute positions) the loss
and every gradient equal TRL's padded batch with the full log-softmax, to 1e-5.
"""

from __future__ import annotations

import random

import pytest
import torch

from lexalign.models import logprobs, packing

FAMILIES = ["llama3", "qwen2", "gemma", "gpt2"]


def _lengths(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([3, 5, 9, 17, 30, 41]) for _ in range(n)]


def test_packed_rows_hold_every_sequence_once_and_unpack_to_the_padded_shape():
    lengths = _lengths(0, 9)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width + 3, dtype=torch.long)  # wider than needed, as pad_to_multiple_of makes it
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(100 * i + 1, 100 * i + 1 + n)
        attention[i, :n] = 1
        completion[i, n // 2:n] = 1
    rows = packing.pack_rows(ids, attention, completion, pad_token_id=0)
    assert rows.input_ids.shape[1] == width
    assert rows.input_ids.shape[0] < len(lengths)  # fewer rows than sequences: the padding is gone
    assert (rows.input_ids != 0).sum().item() == sum(lengths)  # every real token once, nothing else but padding
    for i, n in enumerate(lengths):  # each sequence whole, its positions 0..n-1, its completion scored
        where = (rows.input_ids == 100 * i + 1).nonzero()[0].tolist()
        r, offset = where
        assert rows.input_ids[r, offset:offset + n].tolist() == ids[i, :n].tolist()
        assert rows.position_ids[r, offset:offset + n].tolist() == list(range(n))
        expected = [t if c and j > 0 else -100 for j, (t, c) in enumerate(zip(ids[i, :n].tolist(),
                                                                             completion[i, :n].tolist(), strict=True))]
        assert rows.labels[r, offset:offset + n].tolist() == expected
    # The way back: per-token outputs of the rows land where the padded batch has them.
    per_token = rows.input_ids[:, 1:].float()  # position t of a row "scores" token t + 1
    back = rows.unpack(per_token)
    assert back.shape == (len(lengths), ids.shape[1] - 1)
    assert torch.equal(back, (ids[:, 1:] * attention[:, 1:]).float())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lean_head_equals_the_full_log_softmax(zoo_models, family, monkeypatch):
    """Values and gradients, with tiles small enough that every row and the vocabulary span several."""
    from lexalign.models.loading import load_causal_lm

    monkeypatch.setattr(logprobs, "TOKEN_TILE", 7)
    monkeypatch.setattr(logprobs, "VOCAB_TILE", 96)
    model = load_causal_lm(zoo_models(family), "cpu", train_all_weights=True)
    torch.manual_seed(0)
    prefix = torch.randint(5, min(model.config.vocab_size, 600), (3, 6))
    with torch.no_grad():  # greedy continuations: their tokens are the top tokens (is_top1 true) ...
        ids = model.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=15, min_new_tokens=15,
                             do_sample=False, pad_token_id=0)
    ids[:, 12::3] = torch.randint(5, min(model.config.vocab_size, 600), ids[:, 12::3].shape)  # ... but a few
    labels = ids.clone()
    labels[:, :6] = -100
    logits = model(input_ids=ids).logits.float()
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * (labels[:, 1:] != -100)
    full.sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logprobs.add_lean_lm_head(model, logprobs.DEFAULT_OUTPUTS)
    lean = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert torch.allclose(lean.log_probs, full, atol=1e-5)
    # The metrics DPOTrainer logs from the head: entropy, mean logit, whether the target is the top token.
    with torch.no_grad():
        scored = labels[:, 1:] != -100
        log_p = torch.log_softmax(logits[:, :-1].detach(), -1)
        entropy = -(log_p.exp() * log_p).sum(-1) * scored
        mean_logit = logits[:, :-1].detach().mean(-1) * scored
        top1 = (logits[:, :-1].detach().argmax(-1) == ids[:, 1:]) & scored
    assert torch.allclose(lean.entropy, entropy, atol=1e-5)
    assert torch.allclose(lean.mean_logits, mean_logit, atol=1e-5)
    assert torch.equal(lean.is_top1, top1) and 0 < top1.sum() < scored.sum()
    lean.log_probs.sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-5), (family, name)
    with torch.no_grad():  # generation and plain forwards keep the model's own forward
        assert torch.equal(model(input_ids=ids).logits.float(), logits.detach())


def _pairs(vocab: int, n: int = 5, seed: int = 0):
    rng = random.Random(seed)
    draw = lambda k: [rng.randrange(5, min(vocab, 600)) for _ in range(k)]  # noqa: E731
    return [{"prompt_ids": draw(rng.randint(2, 12)), "chosen_ids": draw(rng.randint(1, 25)),
             "rejected_ids": draw(rng.randint(1, 25)), "ref_chosen_logps": -rng.uniform(20, 60),
             "ref_rejected_logps": -rng.uniform(20, 60)} for _ in range(n)]


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _compare(build, examples, family):
    """Loss and gradients of the same batch, padded then packed; the packed pass runs fewer, full rows."""
    padded_trainer, packed_trainer = build(False), build(True)
    packed_trainer.model.load_state_dict(padded_trainer.model.state_dict())
    batch = padded_trainer.data_collator(examples)
    shapes = []
    hook = packed_trainer.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: shapes.append(tuple(args[0].shape)))
    loss, grads = _loss_and_grads(padded_trainer, batch)
    packed_loss, packed_grads = _loss_and_grads(packed_trainer, batch)
    hook.remove()
    assert shapes and shapes[0][0] < batch["input_ids"].shape[0], shapes  # fewer rows than sequences: packed
    assert torch.allclose(packed_loss, loss, atol=1e-5), (family, packed_loss, loss)
    assert grads.keys() == packed_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5), (family, name)


def _args(tmp_path, **extra):
    return {"output_dir": str(tmp_path), "use_cpu": True, "report_to": [], "per_device_train_batch_size": 5,
            "max_length": 64, "precompute_ref_log_probs": True, "disable_tqdm": True, **extra}


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_on_packed_rows_has_the_padded_loss_and_gradients(zoo_models, family, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig

    from lexalign.models.loading import load_causal_lm, load_tokenizer
    from lexalign.train.dpo_trainer import LexAlignDPOTrainer

    path = zoo_models(family)
    tokenizer = load_tokenizer(path)
    examples = _pairs(600, seed=FAMILIES.index(family))

    def build(padding_free):
        torch.manual_seed(0)
        model = load_causal_lm(path, "cpu", train_all_weights=True)
        return LexAlignDPOTrainer(model=model, args=DPOConfig(**_args(tmp_path, loss_type=["sigmoid", "sft"])),
                                  train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                                  padding_free_batches=padding_free)

    _compare(build, examples, family)


def test_gdpo_and_simpo_with_lora_on_packed_rows_have_the_padded_loss_and_gradients(zoo_models, tmp_path):
    """GDPO's K responses and SimPO's length-normalised pairs; LoRA (the lean head goes under PEFT)."""
    from datasets import Dataset
    from peft import LoraConfig

    from lexalign.models.loading import load_causal_lm, load_tokenizer
    from lexalign.train.ranked_trainer import RankedConfig, RankedTrainer
    from lexalign.train.reference_free_trainer import ReferenceFreeConfig, ReferenceFreeTrainer

    path = zoo_models("llama3")
    tokenizer = load_tokenizer(path)
    rng = random.Random(3)
    draw = lambda k: [rng.randrange(5, 600) for _ in range(k)]  # noqa: E731
    groups = [{"prompt_ids": draw(rng.randint(2, 12)), "completion_ids": [draw(rng.randint(1, 25)) for _ in range(3)],
               "scores": [2.0, 1.0, 0.0], "ref_logps": [-rng.uniform(20, 60) for _ in range(3)]} for _ in range(4)]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    def gdpo(padding_free):
        torch.manual_seed(0)
        model = load_causal_lm(path, "cpu")
        args = RankedConfig(**_args(tmp_path, per_device_train_batch_size=4), group_size=3)
        return RankedTrainer(model=model, args=args, train_dataset=Dataset.from_list(groups),
                           processing_class=tokenizer, peft_config=lora, padding_free_batches=padding_free)

    _compare(gdpo, groups, "llama3 gdpo")

    pairs = [{k: v for k, v in pair.items() if not k.startswith("ref_")} for pair in _pairs(600, seed=4)]

    def simpo(padding_free):
        torch.manual_seed(0)
        model = load_causal_lm(path, "cpu")
        args = ReferenceFreeConfig(**{**_args(tmp_path), "precompute_ref_log_probs": False}, method="simpo",
                                   loss_keys={"gamma": 0.5})
        return ReferenceFreeTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                                    processing_class=tokenizer, peft_config=lora, padding_free_batches=padding_free)

    _compare(simpo, pairs, "llama3 simpo")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none): pytest -m gpu there")
def test_the_lean_head_on_cuda_equals_the_full_log_softmax(zoo_models):
    """On CUDA the lean head hands the scored positions to TRL's Triton kernel: the same values and gradients."""
    from lexalign.models.loading import load_causal_lm

    model = load_causal_lm(zoo_models("gemma"), "cuda", train_all_weights=True).to("cuda")
    torch.manual_seed(0)
    ids = torch.randint(5, 600, (3, 21), device="cuda")
    labels = ids.clone()
    labels[:, :6] = -100
    logits = model(input_ids=ids).logits.float()
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * (labels[:, 1:] != -100)
    full.sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logprobs.add_lean_lm_head(model, logprobs.DEFAULT_OUTPUTS)
    lean = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert torch.allclose(lean.log_probs, full, atol=1e-4)
    lean.log_probs.sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-4), name

