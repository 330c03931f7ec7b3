"""Evaluation figures checked against values computed independently."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from lexalign.core.shares import Share
from lexalign.evaluation.answers import kl_estimate
from lexalign.evaluation.figures import held_out_scores, preference_figures, sequence_logps
from lexalign.models.loading import load_causal_lm


@pytest.fixture(scope="module")
def models(demo_model_dir, sft_model_dir):
    return load_causal_lm(demo_model_dir, "cpu").eval(), load_causal_lm(sft_model_dir, "cpu").eval()


def brute_force_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """log π(completion + EOS | prompt), one token at a time."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    total = 0.0
    for position in range(len(prompt_ids), len(full)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full[:position]])).logits[0, -1]
        total += torch.log_softmax(logits.float(), -1)[full[position]].item()
    return total


def test_sequence_logps_match_token_by_token(models, demo_tokenizer):
    _, sft = models
    prompts = ["User: Please greet Zoe.\nAssistant:", "User: Say hello to Bob.\nAssistant:"]
    completions = [" Hello Zoe, it is lovely to meet you!", " Go away Bob."]  # different lengths: padding matters
    batched = sequence_logps(sft, demo_tokenizer, prompts, completions, batch_size=2)
    for got, prompt, completion in zip(batched, prompts, completions, strict=False):
        assert got == pytest.approx(brute_force_logp(sft, demo_tokenizer, prompt, completion), abs=1e-4)


def test_preference_metrics_of_a_model_against_itself_are_zero(models, demo_tokenizer):
    _, sft = models
    frame = pd.DataFrame({"prompt": ["User: Please greet Zoe.\nAssistant:"] * 2,
                          "chosen": [" Hello Zoe!", " Hello Zoe, welcome!"],
                          "rejected": [" Go away Zoe.", " Go away."]})
    metrics = preference_figures(Share().gather(*held_out_scores(sft, sft, demo_tokenizer, frame, 2, Share())), 0.1)
    assert metrics["pairs"] == 2
    assert metrics["mean_margin"] == 0.0 and metrics["preference_accuracy"] == 0.0  # ties are not wins


def test_kl_estimate_is_zero_against_itself_and_positive_otherwise(models, demo_tokenizer):
    base, sft = models
    prompts = ["User: Please greet Zoe.\nAssistant:", "User: Welcome Bob to the team.\nAssistant:"]
    same = kl_estimate(sft, sft, demo_tokenizer, prompts, max_new_tokens=8, seed=0)
    assert same["mean"] == pytest.approx(0.0, abs=1e-6) and same["estimator"] == "k3"
    kl = kl_estimate(sft, base, demo_tokenizer, prompts * 8, max_new_tokens=8, seed=0)
    assert math.isfinite(kl["mean"]) and kl["mean"] > 0.5 and kl["n"] == 16
    assert kl["ci_low"] <= kl["mean"] <= kl["ci_high"]


def test_every_kl_term_is_non_negative_even_on_one_sample(models, demo_tokenizer):
    """Schulman's k3, Σ_t (ρ_t − 1 − log ρ_t) ≥ 0 per answer: on one sampled answer per prompt, where the plain
    log-ratio (k1) can come out negative, no prompt's estimate does, for either direction of the two models."""
    from lexalign.core.shares import Share
    from lexalign.evaluation.answers import kl_scores

    base, sft = models
    prompts = [f"User: Please greet {name}.\nAssistant:" for name in ("Zoe", "Bob", "Ana", "Kim")]
    for policy, reference in ((sft, base), (base, sft)):
        for seed in range(3):
            values = Share().gather(*kl_scores(policy, reference, demo_tokenizer, prompts, 8, seed, 2, False,
                                               Share()))["kl"]
            assert len(values) == 4 and all(v >= 0 for v in values), values


def _generate_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, int, bool]:
    """transformers' greedy search on one prompt alone (no batch, no padding): (text, tokens, capped)."""
    from lexalign.core import tokens

    stops = tokens.end_ids(model, tokenizer)
    ids = torch.tensor([tokens.prompt_ids(tokenizer, [prompt], False)[0]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops, pad_token_id=stops[0])[0, ids.shape[1]:].tolist()
    end = next((j for j, t in enumerate(out) if t in stops), None)
    kept = out if end is None else out[:end]
    return tokenizer.decode(kept, skip_special_tokens=True), len(kept), end is None


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_answers_are_generates_greedy_search_answer_for_answer(models, demo_tokenizer, batch_size):
    """Batched by LexAlign's sampler (answers leaving the batch as they end, the next prompt joining), each answer
    is the one transformers' greedy search gives that prompt alone."""
    from lexalign.evaluation.answers import generate_answers

    base, sft = models
    prompts = [f"User: Please greet {name}.\nAssistant:" for name in ("Zoe", "Bob", "Ana", "Kim", "Li")]
    for model in (base, sft):
        answers = generate_answers(model, demo_tokenizer, prompts, 12, batch_size)
        expected = [_generate_greedy(model, demo_tokenizer, p, 12) for p in prompts]
        assert [(a["text"], a["tokens"], a["capped"]) for a in answers] == expected


def test_the_kl_of_a_sampled_answer_is_k3_summed_over_its_tokens(models, demo_tokenizer):
    """The estimate of one prompt recomputed by hand: the answer the policy sampled (read back from the sampler with
    the same seed), each token's log-ratio from one forward pass per token."""
    from lexalign.core import tokens
    from lexalign.evaluation.answers import kl_scores
    from lexalign.generation import fast_sampling

    base, sft = models
    prompt = "User: Please greet Zoe.\nAssistant:"
    value = Share().gather(*kl_scores(sft, base, demo_tokenizer, [prompt], 10, 5, 4, False, Share()))["kl"][0]
    ids = tokens.prompt_ids(demo_tokenizer, [prompt], False)[0]
    answer = fast_sampling.sample(sft, [[ids]], [5], tokens.end_ids(sft, demo_tokenizer), 1, 1.0, 1.0, 10)[0][0][0][0]
    total = 0.0
    for t in range(len(answer)):
        context = torch.tensor([ids + answer[:t]])
        with torch.no_grad():
            log_ratio = (torch.log_softmax(base(input_ids=context).logits[0, -1].float(), -1)[answer[t]]
                         - torch.log_softmax(sft(input_ids=context).logits[0, -1].float(), -1)[answer[t]]).item()
        total += math.expm1(log_ratio) - log_ratio
    assert value == pytest.approx(total, rel=1e-4, abs=1e-6)
