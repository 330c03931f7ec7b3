"""The evaluate step: did alignment work?

For the SFT model and the aligned model, on held-out data:
- preference accuracy on held-out pairs: the implicit DPO reward
  r = β·(log π(y|x) − log π_SFT(y|x)) ranks chosen above rejected (and GDPO's
  ranking metrics on groups of K);
- a Monte Carlo estimate of KL(aligned ‖ SFT);
- greedy answers of both models to the same held-out prompts: `samples` (side
  by side) and `length` (mean tokens, their ratio, the share cut at the cap);
- a judge's win rate of the aligned answers against the SFT answers, with a
  bootstrap 95% interval (`lexalign.judges`: demo, reward_model or llm).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lexalign import tokens
from lexalign.config.stages import EvaluateConfig
from lexalign.methods import Layout


def pad_id(tokenizer) -> int:
    """The id padding is filled with: masked out everywhere, so any id does (GPT-2 has no pad token)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def sequence_logps(model, tokenizer, prompts: list[str], completions: list[str], chat: bool = False,
                   batch_size: int = 16, max_length: int | None = None) -> list[float]:
    """Sum of log π(completion tokens | prompt) for each pair, on the trainers' tokens (lexalign.tokens).

    Scored as the reference step scores: packed padding-free, log-probs of the completion tokens only
    (`lexalign.packing.sequence_logps`); `batch_size` is the padded batch where a model cannot be packed."""
    from lexalign import packing

    device = next(model.parameters()).device
    prompt_ids, completion_ids = tokens.tokenize_groups(tokenizer, prompts, [[c] for c in completions], chat)
    sequences = [p + c[0] for p, c in zip(prompt_ids, completion_ids, strict=True)]
    if max_length:  # keep_start, as the trainers' collator truncates
        sequences = [s[:max_length] for s in sequences]
    return packing.sequence_logps(model, sequences, [len(p) for p in prompt_ids], str(device),
                                  batch_size=batch_size, pad_token_id=pad_id(tokenizer))


def _prompt_batch(tokenizer, prompts: list[str], chat: bool, device):
    """Left-padded prompt ids for generation, by the same rule as training (lexalign.tokens)."""
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


def preference_metrics(policy, reference, tokenizer, frame: pd.DataFrame, beta: float, batch_size: int) -> dict:
    prompts = frame["prompt"].tolist()
    chat = tokens.chat_rendered(frame)
    logps = {
        (name, side): sequence_logps(model, tokenizer, prompts, frame[side].tolist(), chat, batch_size)
        for name, model in (("policy", policy), ("reference", reference))
        for side in ("chosen", "rejected")
    }
    rewards = {
        side: [beta * (p - r) for p, r in zip(logps["policy", side], logps["reference", side], strict=False)]
        for side in ("chosen", "rejected")
    }
    margins = [c - r for c, r in zip(rewards["chosen"], rewards["rejected"], strict=False)]
    n = max(len(margins), 1)
    return {
        "pairs": len(margins),
        "preference_accuracy": sum(m > 0 for m in margins) / n,
        "mean_margin": sum(margins) / n,
        "logp_accuracy_policy": sum(c > r for c, r in zip(logps["policy", "chosen"], logps["policy", "rejected"],
                                                          strict=True)) / n,
        "logp_accuracy_reference": sum(c > r for c, r in zip(logps["reference", "chosen"],
                                                              logps["reference", "rejected"], strict=False)) / n,
    }


def unpaired_metrics(policy, reference, tokenizer, frame: pd.DataFrame, beta: float, batch_size: int) -> dict:
    """Held-out unpaired rows (KTO's data): the implicit reward of each completion should be positive for the
    desirable ones and negative for the others. `preference_accuracy` is the share of rows it sorts so, and
    `mean_margin` the mean desirable reward minus the mean undesirable one."""
    prompts, completions = frame["prompt"].tolist(), frame["completion"].tolist()
    labels = [bool(v) for v in frame["label"]]
    chat = tokens.chat_rendered(frame)
    policy_logps = sequence_logps(policy, tokenizer, prompts, completions, chat, batch_size)
    reference_logps = sequence_logps(reference, tokenizer, prompts, completions, chat, batch_size)
    rewards = [beta * (p - r) for p, r in zip(policy_logps, reference_logps, strict=True)]
    good = [r for r, label in zip(rewards, labels, strict=True) if label]
    bad = [r for r, label in zip(rewards, labels, strict=True) if not label]
    n = max(len(rewards), 1)
    return {
        "held_out": Layout.UNPAIRED.value,
        "pairs": 0,
        "rows": len(rewards),
        "preference_accuracy": sum((r > 0) == label for r, label in zip(rewards, labels, strict=True)) / n,
        "mean_margin": (sum(good) / max(len(good), 1)) - (sum(bad) / max(len(bad), 1)),
    }


def ranking_metrics(policy, reference, tokenizer, frame: pd.DataFrame, beta: float, batch_size: int) -> dict:
    """Over groups of K ranked responses: Kendall's tau between the implicit rewards and the given ranking,
    strict top-1 accuracy and pair accuracy (GDPO's metrics), averaged over prompts."""
    import torch

    from lexalign.losses.gdpo import kendall_tau, pair_accuracy, top1_accuracy

    groups = [(p, list(r), list(s))
              for p, r, s in zip(frame["prompt"], frame["responses"], frame["scores"], strict=True)]
    k = min((len(r) for _, r, _ in groups), default=0)
    groups = [(p, r[:k], s[:k]) for p, r, s in groups if len(r) == k]
    if k < 3 or not groups:
        return {}
    prompts = [p for p, r, _ in groups for _ in r]
    responses = [y for _, r, _ in groups for y in r]
    chat = tokens.chat_rendered(frame)
    policy_logps = sequence_logps(policy, tokenizer, prompts, responses, chat, batch_size)
    reference_logps = sequence_logps(reference, tokenizer, prompts, responses, chat, batch_size)
    rewards = beta * (torch.tensor(policy_logps) - torch.tensor(reference_logps)).view(len(groups), k)
    scores = torch.tensor([s for _, _, s in groups], dtype=torch.float32)
    return {
        "ranking_groups": len(groups),
        "ranking_k": k,
        "kendall_tau": float(torch.nanmean(kendall_tau(rewards, scores))),
        "top1_accuracy": float(top1_accuracy(rewards, scores).float().mean()),
        "pair_accuracy": float(torch.nanmean(pair_accuracy(rewards, scores))),
    }


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                     chat: bool = False) -> list[dict]:
    """Greedy answers (deterministic, so judged figures are reproducible), stopping at any of the model's end
    ids (generation_config's list: Llama-3's, Phi-3's and Gemma's several). Each: `text`, `tokens` (the
    answer's tokens, its end id not counted) and `capped` (cut at max_new_tokens before an end id)."""
    import torch

    device = next(model.parameters()).device
    stops = tokens.end_ids(model, tokenizer)
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = _prompt_batch(tokenizer, prompts[start:start + batch_size], chat, device)
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=stops, pad_token_id=pad_id(tokenizer))
        for row in generated[:, batch["input_ids"].shape[1]:].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), None)
            ids = row if end is None else row[:end]
            out.append({"text": tokenizer.decode(ids, skip_special_tokens=True), "tokens": len(ids),
                        "capped": end is None and len(row) >= max_new_tokens})
    return out


def _generated_logps(model, tokens, attention, start: int, keep) -> list[float]:
    """Sum of log-probs of the sampled tokens (positions >= start where `keep`)."""
    import torch

    from lexalign.logprobs import ensure_lean_head

    ensure_lean_head(model)  # the sampled tokens' log-probs only, never the [tokens x vocab] logits
    labels = torch.full_like(tokens, -100)
    labels[:, start:] = tokens[:, start:].masked_fill(keep == 0, -100)
    with torch.no_grad():
        outputs = model(input_ids=tokens, attention_mask=attention, labels=labels, use_cache=False,
                        fused_lm_head=True)
    return outputs.log_probs.float().sum(-1).tolist()


def kl_estimate(policy, reference, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                batch_size: int = 16, chat: bool = False) -> float:
    """Monte Carlo KL(aligned ‖ SFT) per prompt: sample y ~ π_aligned at temperature 1 and average
    log π_aligned(y|x) − log π_SFT(y|x) over the sampled token ids (an unbiased estimate)."""
    import torch

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    device = next(policy.parameters()).device
    stops = tokens.end_ids(policy, tokenizer)
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        batch = _prompt_batch(tokenizer, prompts[start:start + batch_size], chat, device)
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
        diff = [p - r for p, r in zip(_generated_logps(policy, generated_ids, attention, width, keep),
                                      _generated_logps(reference, generated_ids, attention, width, keep),
                                      strict=False)]
        total += sum(diff)
        count += len(diff)
    torch.random.set_rng_state(generator_state)
    return total / max(count, 1)


LENGTH_GROWTH_FLAG = 1.2
"""A run whose answers are on average more than 20% longer than the SFT model's is flagged (DPO's best-known
failure: answers that get longer rather than better)."""


def generation_prompts(eval_frame: pd.DataFrame, cfg: EvaluateConfig, seed: int) -> tuple[list[str], bool]:
    """The held-out prompts both models answer, and whether they are chat-rendered: the demo judge's prompts
    (never trained on) with judge demo, else the distinct prompts of the held-out pairs in a seeded order;
    `num_samples` of them, or `num_prompts` when a judge scores them."""
    import random

    count = max(cfg.num_samples, cfg.num_prompts if cfg.judge != "none" else 0)
    if cfg.judge == "demo":
        from lexalign.demo import task

        return task.eval_prompts(seed, count), False
    prompts = sorted(set(eval_frame["prompt"])) if len(eval_frame) else []
    random.Random(seed).shuffle(prompts)
    return prompts[:count], tokens.chat_rendered(eval_frame)


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


def evaluate(aligned: Path, reference: Path, eval_frame: pd.DataFrame, cfg: EvaluateConfig, beta: float,
             seed: int = 42, ranked_frame: pd.DataFrame | None = None, reward_model: Path | None = None,
             device: str = "cpu") -> dict:
    from lexalign import judges
    from lexalign.models import load_causal_lm, load_tokenizer, require_model

    require_model(aligned, "lexalign align --config config/align.yaml")
    require_model(reference, "lexalign finetune --config config/finetune.yaml")
    judges.check(cfg, reward_model)  # a wrong judge fails now, not after the generations
    tokenizer = load_tokenizer(aligned)
    policy = load_causal_lm(aligned, device).to(device).eval()
    ref = load_causal_lm(reference, device).to(device).eval()
    result = {
        "aligned": str(aligned),
        "reference": str(reference),
        "beta": beta,
        **(unpaired_metrics if "label" in eval_frame.columns else preference_metrics)(
            policy, ref, tokenizer, eval_frame, beta, cfg.batch_size),
    }
    if ranked_frame is not None and len(ranked_frame):
        result.update(ranking_metrics(policy, ref, tokenizer, ranked_frame, beta, cfg.batch_size))
    eval_prompts = sorted(set(eval_frame["prompt"]))[: cfg.num_prompts]
    result["kl_estimate"] = kl_estimate(policy, ref, tokenizer, eval_prompts, cfg.max_new_tokens, seed,
                                        cfg.batch_size, tokens.chat_rendered(eval_frame)) if eval_prompts else None
    prompts, chat = generation_prompts(eval_frame, cfg, seed)
    answers = {name: generate_answers(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, chat)
               for name, model in (("sft", ref), ("aligned", policy))}
    texts = {name: [a["text"] for a in rows] for name, rows in answers.items()}
    result["decoding"] = {"strategy": "greedy", "max_new_tokens": cfg.max_new_tokens, "prompts": len(prompts),
                          "chat_template": chat}
    result["samples"] = [{"prompt": p, "sft": s, "aligned": a}
                         for p, s, a in list(zip(prompts, texts["sft"], texts["aligned"], strict=True))
                         [: cfg.num_samples]]
    result["length"] = length_summary(answers)
    del policy, ref  # the reward model (judge reward_model) gets their memory
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    judged = judges.judge(cfg, prompts, texts["sft"], texts["aligned"], chat, seed, reward_model, device)
    if judged is not None:
        result["judge"] = judged
    if cfg.judge == "demo" and judged and judged["n"]:
        # The demo's judged rates, as before: the share of polite greetings of each model.
        result["generation"] = {"judge": judged["name"], "decoding": "greedy", "prompts": judged["n"],
                                "sft_rate": judged["mean_reward_sft"], "aligned_rate": judged["mean_reward_aligned"],
                                "rise_points": 100 * (judged["mean_reward_aligned"] - judged["mean_reward_sft"])}
    return result


def _interval(judge: dict) -> str:
    if judge.get("ci_low") is None:
        return ""
    return f" (95% CI {100 * judge['ci_low']:.1f}–{100 * judge['ci_high']:.1f}%)"


def summary(result: dict) -> str:
    held_out = f"{result['rows']} held-out unpaired rows" if result.get("held_out") == Layout.UNPAIRED.value \
        else f"{result['pairs']} held-out pairs"
    lines = [
        f"Preference accuracy on {held_out}: {result['preference_accuracy']:.3f} "
        f"(mean reward margin {result['mean_margin']:.3f})"
    ]
    if result.get("kl_estimate") is not None:
        lines.append(f"KL(aligned ‖ SFT) estimate per prompt: {result['kl_estimate']:.3f} nats")
    length = result.get("length")
    if length:
        ratio = length["ratio"]
        grew = ratio is not None and ratio > LENGTH_GROWTH_FLAG
        lines.append(f"Answer length (greedy, {length['n']} prompts): SFT {length['sft_mean_tokens']:.1f} → aligned "
                     f"{length['aligned_mean_tokens']:.1f} tokens"
                     + (f" (×{ratio:.2f})" if ratio is not None else "")
                     + (" — grew by more than 20%: check the samples for answers longer rather than better"
                        if grew else ""))
    judge = result.get("judge")
    if judge and judge.get("win_rate") is not None:
        lines.append(f"Win rate against the SFT model ({judge['name']}, {judge['n']} prompts): "
                     f"{100 * judge['win_rate']:.1f}%{_interval(judge)}; {judge['wins']} wins, {judge['ties']} ties, "
                     f"{judge['losses']} losses"
                     + (f"; {judge['unparseable']} unparseable verdicts counted as ties" if judge.get("unparseable")
                        else ""))
    gen = result.get("generation")
    if gen:
        lines.append(
            f"Judged wanted behaviour ({gen['judge']}, {gen['decoding']}, {gen['prompts']} prompts): "
            f"SFT {100 * gen['sft_rate']:.1f}% → aligned {100 * gen['aligned_rate']:.1f}% "
            f"({gen['rise_points']:+.1f} points)"
        )
    return "\n".join(lines)
