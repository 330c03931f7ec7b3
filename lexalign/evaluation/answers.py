"""The models' answers to held-out prompts: greedy answers by the trainers' tokens, their lengths, and the KL
estimate on answers sampled from the aligned model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lexalign.core import io, tokens
from lexalign.core.shares import Share, chunks, piece
from lexalign.core.tokens import pad_id

ANSWERS_FORMAT = 1
"""Bumped when greedy answering changes what it returns for the same model and prompts (part of the cache key)."""


def cached_answers(cache_dir: str | Path | None, model_dir: str | Path, tokenizer_dir: str | Path, device: str,
                   prompts: list[str], decoding: dict, answer: Callable[[list[str]], list]) -> tuple[list, bool]:
    """`answer(prompts)`: a model's greedy answers, kept in `cache_dir` under a key of everything they depend on
    (the weights, the tokenizer, the prompts, the decoding, the device, LexAlign's and torch's versions), and
    whether they came from there. Every round's evaluation answers with the starting model on the same held-out
    prompts: the rounds after the first read its answers instead of decoding them again. `cache_dir` None: no
    cache. A cache file is only an optimisation (written atomically; a damaged one is answered again)."""
    if not prompts:
        return [], False
    if cache_dir is None:
        return answer(prompts), False
    import torch

    import lexalign
    from lexalign.reference.keys import tokenizer_hash, weights_hash

    key = {"format": ANSWERS_FORMAT, "weights": weights_hash(model_dir), "tokenizer": tokenizer_hash(tokenizer_dir),
           "prompts": prompts, "decoding": decoding, "device": device, "lexalign": lexalign.__version__,
           "torch": torch.__version__}
    path = Path(cache_dir) / f"{io.hash_object(key)}.json"
    try:
        kept = io.read_json(path)
        if kept.get("key") == key and len(kept.get("answers") or []) == len(prompts):
            return kept["answers"], True
    except (OSError, ValueError):
        pass
    answers = answer(prompts)
    io.write_json(path, {"key": key, "answers": answers})
    return answers, False


def _prompt_batch(tokenizer, prompts: list[str], chat: bool, device):
    """Left-padded prompt ids for generation, by the same rule as training (lexalign.core.tokens)."""
    import torch

    ids = tokens.prompt_ids(tokenizer, prompts, chat)
    width = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), width), pad_id(tokenizer), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, seq in enumerate(ids):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(seq)
            attention[row, width - len(seq):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                     chat: bool = False, batches: list[list[int]] | None = None) -> list[dict | None]:
    """Greedy answers (deterministic, so judged figures are reproducible), stopping at any of the model's end
    ids (generation_config's list: Llama-3's, Phi-3's and Gemma's several). Each: `text`, `tokens` (the
    answer's tokens, its end id not counted) and `capped` (cut at max_new_tokens before an end id). Prompts go
    `batch_size` at a time in order; `batches`: only these (a process's share), the other answers are None.

    LexAlign's sampler decodes them (`fast_sampling`, top_p 0: the most likely token, as generate's greedy
    search picks it), with at most `batch_size` answers at once and the next prompt joining as one ends;
    transformers' generate where the model's cache is not one the sampler handles."""
    stops = tokens.end_ids(model, tokenizer)
    batches = chunks(len(prompts), batch_size) if batches is None else batches
    out: list[dict | None] = [None] * len(prompts)
    for batch, answer in zip(batches, _greedy(model, tokenizer, prompts, batches, chat, stops, max_new_tokens,
                                              batch_size), strict=True):
        for i, (ids, capped) in zip(batch, answer, strict=True):
            ids = ids if capped else ids[:-1]  # the end id is not the answer's
            out[i] = {"text": tokenizer.decode(ids, skip_special_tokens=True), "tokens": len(ids), "capped": capped}
    return out


def _greedy(model, tokenizer, prompts: list[str], batches: list[list[int]], chat: bool, stops: list[int],
            max_new_tokens: int, rows: int) -> list[list[tuple[list[int], bool]]]:
    """Per batch, per prompt: (the greedy completion ids through the end id, cut at max_new_tokens)."""
    import torch

    from lexalign.generation import fast_sampling

    ids = tokens.prompt_ids(tokenizer, [prompts[i] for batch in batches for i in batch], chat)
    grouped, start = [], 0
    for batch in batches:
        grouped.append(ids[start:start + len(batch)])
        start += len(batch)
    decoded = fast_sampling.sample(model, grouped, [0] * len(batches), stops, 1, 1.0, 0.0, max_new_tokens,
                                   rows=max(rows, 1)) if grouped else []
    if decoded is not None:
        return [[answers[0] for answers in batch] for batch in decoded]
    device, out = next(model.parameters()).device, []
    for batch in batches:  # transformers' generate: a cache the sampler does not handle
        inputs = _prompt_batch(tokenizer, [prompts[i] for i in batch], chat, device)
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=stops, pad_token_id=pad_id(tokenizer))
        answers = []
        for row in generated[:, inputs["input_ids"].shape[1]:].tolist():
            end = next((j for j, token in enumerate(row) if token in stops), None)
            answers.append((row, True) if end is None else (row[:end + 1], False))
        out.append(answers)
    return out


def _token_logps(model, tokens, attention, start: int, keep):
    """[B, T]: the log-prob of each sampled token (positions >= start where `keep`; 0 elsewhere)."""
    import torch

    from lexalign.models.logprobs import ensure_lean_head

    ensure_lean_head(model)  # the sampled tokens' log-probs only, never the [tokens x vocab] logits
    labels = torch.full_like(tokens, -100)
    labels[:, start:] = tokens[:, start:].masked_fill(keep == 0, -100)
    with torch.no_grad():
        outputs = model(input_ids=tokens, attention_mask=attention, labels=labels, use_cache=False,
                        fused_lm_head=True)
    return outputs.log_probs.float()


def kl_scores(policy, reference, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int,
              chat: bool, share: Share) -> tuple[dict, dict]:
    """For each prompt, the KL(aligned ‖ SFT) of an answer y sampled from the aligned model at temperature 1, by
    Schulman's k3 estimator summed over y's tokens: with ρ_t = π_SFT(y_t|x, y_<t) / π_aligned(y_t|x, y_<t),
    Σ_t (ρ_t − 1 − log ρ_t). Each term is ≥ 0, and its expectation over the token the aligned model samples is the
    KL between the two next-token distributions, so the sum is a non-negative, unbiased estimate of the answer's
    KL (the chain rule); the plain Σ_t −log ρ_t (k1) is unbiased too but goes negative on few samples. For this
    process's share of the prompt batches; batch i samples from seed + i, so it draws the same answers in
    whichever process runs it (the global RNG is left as it was)."""
    import torch

    mine = share.take(list(enumerate(chunks(len(prompts), batch_size))))
    values: list[float | None] = [None] * len(prompts)
    state = torch.random.get_rng_state()
    try:
        for index, batch in mine:
            found = _kl_batch(policy, reference, tokenizer, [prompts[i] for i in batch], max_new_tokens, chat,
                              seed + index)
            for i, value in zip(batch, found, strict=True):
                values[i] = value
    finally:
        torch.random.set_rng_state(state)
    return {"kl": piece([batch for _, batch in mine], values)}, {"kl": len(prompts)}


def _kl_batch(policy, reference, tokenizer, prompts: list[str], max_new_tokens: int, chat: bool,
              seed: int) -> list[float]:
    """One batch of `kl_scores`: sample one answer a prompt from the policy at temperature 1 (LexAlign's sampler,
    seeded; transformers' generate from the seeded global RNG where the sampler does not apply), then score the
    sampled tokens under both models."""
    import torch

    from lexalign.generation import fast_sampling

    device = next(policy.parameters()).device
    stops = tokens.end_ids(policy, tokenizer)
    batch = _prompt_batch(tokenizer, prompts, chat, device)
    width = batch["input_ids"].shape[1]
    drawn = fast_sampling.sample(policy, [tokens.prompt_ids(tokenizer, prompts, chat)], [seed], stops, 1, 1.0, 1.0,
                                 max_new_tokens)
    if drawn is not None:
        answers = [answer[0][0] for answer in drawn[0]]  # each answer's ids through its end id
        generated = torch.full((len(answers), max(map(len, answers))), pad_id(tokenizer), dtype=torch.long)
        for row, answer in enumerate(answers):
            generated[row, :len(answer)] = torch.tensor(answer)
        generated = generated.to(device)
        keep = (torch.arange(generated.shape[1], device=device) < torch.tensor(
            [len(a) for a in answers], device=device).unsqueeze(1)).float()
        generated_ids = torch.cat([batch["input_ids"], generated], dim=1)
    else:
        torch.manual_seed(seed)
        with torch.no_grad():
            generated_ids = policy.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                                            top_k=0, top_p=1.0, eos_token_id=stops, pad_token_id=pad_id(tokenizer))
        generated = generated_ids[:, width:]
        # Keep each sampled token up to and including the first end id.
        is_end = torch.isin(generated, torch.tensor(stops, device=generated.device)) if stops \
            else torch.zeros_like(generated, dtype=torch.bool)
        after_end = is_end.long().cumsum(-1)
        keep = ((after_end == 0) | ((after_end == 1) & is_end)).float()
    attention = torch.cat([batch["attention_mask"], keep.long()], dim=1)
    log_ratio = _token_logps(reference, generated_ids, attention, width, keep) - \
        _token_logps(policy, generated_ids, attention, width, keep)  # 0 where no token is scored
    return (torch.expm1(log_ratio) - log_ratio).sum(-1).tolist()


def kl_estimate(policy, reference, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                batch_size: int = 16, chat: bool = False) -> dict:
    """KL(aligned ‖ SFT) per prompt, scored in this process (`kl_scores`), with its interval (`kl_figure`)."""
    scores = kl_scores(policy, reference, tokenizer, prompts, max_new_tokens, seed, batch_size, chat, Share())
    return kl_figure(Share().gather(*scores)["kl"], seed)


def kl_figure(values: list[float], seed: int = 0) -> dict:
    """The mean of the per-prompt KL estimates and its bootstrap 95% interval (resampling the prompts)."""
    from lexalign.core.intervals import bootstrap_interval

    mean = sum(values) / max(len(values), 1)
    low, high = bootstrap_interval(values, seed=seed) if len(values) > 1 else (mean, mean)
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": len(values), "estimator": "k3"}


def length_summary(answers: dict[str, list[dict]]) -> dict | None:
    """Mean answer length in tokens of each model, their ratio (aligned / SFT) and the share cut at the cap."""
    n = len(answers["sft"])
    if not n:
        return None
    mean = {name: sum(a["tokens"] for a in rows) / n for name, rows in answers.items()}
    return {
        "n": n,
        "sft_mean_tokens": mean["sft"],
        "aligned_mean_tokens": mean["aligned"],
        "ratio": mean["aligned"] / mean["sft"] if mean["sft"] else None,
        "sft_capped_share": sum(a["capped"] for a in answers["sft"]) / n,
        "aligned_capped_share": sum(a["capped"] for a in answers["aligned"]) / n,
    }
