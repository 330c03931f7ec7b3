"""The models' answers to held-out prompts: greedy answers by the trainers' tokens, their lengths, and the KL
estimate on answers sampled from the aligned model."""

from __future__ import annotations

from lexalign.core import tokens
from lexalign.core.shares import Share, chunks, piece
from lexalign.core.tokens import pad_id


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
    `batch_size` at a time in order; `batches`: only these (a process's share), the other answers are None."""
    import torch

    device = next(model.parameters()).device
    stops = tokens.end_ids(model, tokenizer)
    out: list[dict | None] = [None] * len(prompts)
    for batch in chunks(len(prompts), batch_size) if batches is None else batches:
        inputs = _prompt_batch(tokenizer, [prompts[i] for i in batch], chat, device)
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=stops, pad_token_id=pad_id(tokenizer))
        for i, row in zip(batch, generated[:, inputs["input_ids"].shape[1]:].tolist(), strict=True):
            end = next((j for j, token in enumerate(row) if token in stops), None)
            ids = row if end is None else row[:end]
            out[i] = {"text": tokenizer.decode(ids, skip_special_tokens=True), "tokens": len(ids),
                      "capped": end is None and len(row) >= max_new_tokens}
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
            torch.manual_seed(seed + index)
            found = _kl_batch(policy, reference, tokenizer, [prompts[i] for i in batch], max_new_tokens, chat)
            for i, value in zip(batch, found, strict=True):
                values[i] = value
    finally:
        torch.random.set_rng_state(state)
    return {"kl": piece([batch for _, batch in mine], values)}, {"kl": len(prompts)}


def _kl_batch(policy, reference, tokenizer, prompts: list[str], max_new_tokens: int, chat: bool) -> list[float]:
    """One batch of `kl_scores`: sample, then score the sampled tokens under both models."""
    import torch

    device = next(policy.parameters()).device
    stops = tokens.end_ids(policy, tokenizer)
    batch = _prompt_batch(tokenizer, prompts, chat, device)
    width = batch["input_ids"].shape[1]
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
