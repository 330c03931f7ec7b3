"""The evaluate step: did alignment work?

For the SFT model and the aligned model, on held-out data:
- preference accuracy on held-out pairs: the implicit DPO reward
  r = β·(log π(y|x) − log π_SFT(y|x)) ranks chosen above rejected (and GDPO's
  ranking metrics on groups of K);
- a Monte Carlo estimate of KL(aligned ‖ SFT);
- greedy answers of both models to the same held-out prompts: `samples` (side
  by side) and `length` (mean tokens, their ratio, the share cut at the cap);
- a judge's win rate of the aligned answers against the SFT answers, with a
  bootstrap 95% interval (`lexalign.generation.judges`: demo, reward_model or llm).

Each measure is scored per example, then summed up: in several processes
(`scale.evaluate`) each scores its share of the batches and the main process
computes the figures from all of them (`lexalign.core.shares`), the same figures
one process computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lexalign.config.sections import EvaluateConfig
from lexalign.core import tokens
from lexalign.core.shares import Share, chunks, piece
from lexalign.core.tokens import pad_id
from lexalign.evaluation.answers import generate_answers, kl_figure, kl_scores, length_summary
from lexalign.methods import Layout


def held_out_sequences(tokenizer, prompts: list[str], completions: list[str], chat: bool = False,
                       max_length: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Prompt + completion ids of each pair on the trainers' tokens (lexalign.core.tokens), keep_start-truncated to
    `max_length` as the trainers' collator truncates, and where each completion starts."""
    prompt_ids, completion_ids = tokens.tokenize_groups(tokenizer, prompts, [[c] for c in completions], chat)
    sequences = [p + c[0] for p, c in zip(prompt_ids, completion_ids, strict=True)]
    if max_length:
        sequences = [s[:max_length] for s in sequences]
    return sequences, [len(p) for p in prompt_ids]


def sequence_logps(model, tokenizer, prompts: list[str], completions: list[str], chat: bool = False,
                   batch_size: int = 16, max_length: int | None = None) -> list[float]:
    """Sum of log π(completion tokens | prompt) for each pair, on the trainers' tokens (lexalign.core.tokens).

    Scored as the reference step scores: packed padding-free, log-probs of the completion tokens only
    (`lexalign.models.packing.sequence_logps`); `batch_size` is the padded batch where a model cannot be packed."""
    from lexalign.models import packing

    device = next(model.parameters()).device
    sequences, starts = held_out_sequences(tokenizer, prompts, completions, chat, max_length)
    return packing.sequence_logps(model, sequences, starts, str(device), batch_size=batch_size,
                                  pad_token_id=pad_id(tokenizer))


def scored(models: dict, tokenizer, prompts: list[str], completions: list[str], chat: bool, batch_size: int,
           share: Share, name: str) -> tuple[dict, dict]:
    """Each model's `sequence_logps` of the completions, for this process's share of the batches (lexalign.core.shares):
    the pieces `<name>/<model>` and their sizes."""
    from lexalign.models import packing

    sequences, starts = held_out_sequences(tokenizer, prompts, completions, chat)
    first = next(iter(models.values()))
    device = str(next(first.parameters()).device)
    mine = share.take(packing.plan_batches(first, [len(s) for s in sequences], device, batch_size=batch_size))
    pieces = {f"{name}/{label}": piece(mine, packing.sequence_logps(model, sequences, starts, device,
                                                                     batch_size=batch_size,
                                                                     pad_token_id=pad_id(tokenizer), batches=mine))
              for label, model in models.items()}
    return pieces, dict.fromkeys(pieces, len(sequences))


def _alone(scores: tuple[dict, dict]) -> dict[str, list]:
    """The values of (pieces, sizes) scored by one process alone."""
    return Share().gather(*scores)


def held_out_scores(policy, reference, tokenizer, frame: pd.DataFrame, batch_size: int, share: Share
                    ) -> tuple[dict, dict]:
    """The log-probs behind the held-out figures: of the chosen and the rejected answers (pairs), or of each
    completion (unpaired rows, KTO's data)."""
    models = {"policy": policy, "reference": reference}
    pieces, sizes = {}, {}
    for side in ("completion",) if "label" in frame.columns else ("chosen", "rejected"):
        found = scored(models, tokenizer, frame["prompt"].tolist(), frame[side].tolist(), tokens.chat_rendered(frame),
                       batch_size, share, side)
        pieces.update(found[0])
        sizes.update(found[1])
    return pieces, sizes


def held_out_figures(logps: dict[str, list], frame: pd.DataFrame, beta: float) -> dict:
    """Preference accuracy and margins from `held_out_scores`' values (pairs, or unpaired rows)."""
    return unpaired_figures(logps, frame, beta) if "label" in frame.columns else preference_figures(logps, beta)


def preference_figures(logps: dict[str, list], beta: float) -> dict:
    rewards = {
        side: [beta * (p - r) for p, r in zip(logps[f"{side}/policy"], logps[f"{side}/reference"], strict=True)]
        for side in ("chosen", "rejected")
    }
    margins = [c - r for c, r in zip(rewards["chosen"], rewards["rejected"], strict=True)]
    n = max(len(margins), 1)
    return {
        "pairs": len(margins),
        "preference_accuracy": sum(m > 0 for m in margins) / n,
        "mean_margin": sum(margins) / n,
        "logp_accuracy_policy": sum(c > r for c, r in zip(logps["chosen/policy"], logps["rejected/policy"],
                                                          strict=True)) / n,
        "logp_accuracy_reference": sum(c > r for c, r in zip(logps["chosen/reference"], logps["rejected/reference"],
                                                             strict=True)) / n,
    }


def unpaired_figures(logps: dict[str, list], frame: pd.DataFrame, beta: float) -> dict:
    """Held-out unpaired rows (KTO's data): the implicit reward of each completion should be positive for the
    desirable ones and negative for the others. `preference_accuracy` is the share of rows it sorts so, and
    `mean_margin` the mean desirable reward minus the mean undesirable one."""
    labels = [bool(v) for v in frame["label"]]
    rewards = [beta * (p - r) for p, r in zip(logps["completion/policy"], logps["completion/reference"], strict=True)]
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


def ranked_groups(frame: pd.DataFrame) -> tuple[int, list[tuple]]:
    """K (the fewest responses of any group) and the groups of exactly K: (prompt, responses, scores) each."""
    groups = [(p, list(r), list(s))
              for p, r, s in zip(frame["prompt"], frame["responses"], frame["scores"], strict=True)]
    k = min((len(r) for _, r, _ in groups), default=0)
    return k, [(p, r[:k], s[:k]) for p, r, s in groups if len(r) == k]


def ranking_scores(policy, reference, tokenizer, frame: pd.DataFrame, batch_size: int, share: Share
                   ) -> tuple[dict, dict]:
    """The log-probs of every response of the ranked groups of K (none below K = 3)."""
    k, groups = ranked_groups(frame)
    if k < 3 or not groups:
        return {}, {}
    prompts = [p for p, r, _ in groups for _ in r]
    responses = [y for _, r, _ in groups for y in r]
    return scored({"policy": policy, "reference": reference}, tokenizer, prompts, responses,
                  tokens.chat_rendered(frame), batch_size, share, "ranked")


def ranking_figures(logps: dict[str, list], frame: pd.DataFrame, beta: float) -> dict:
    """Over groups of K ranked responses: Kendall's tau between the implicit rewards and the given ranking,
    strict top-1 accuracy and pair accuracy (GDPO's metrics), averaged over prompts."""
    import torch

    from lexalign.methods.gdpo import kendall_tau, pair_accuracy, top1_accuracy

    k, groups = ranked_groups(frame)
    if k < 3 or not groups:
        return {}
    rewards = beta * (torch.tensor(logps["ranked/policy"]) - torch.tensor(logps["ranked/reference"])).view(len(groups),
                                                                                                           k)
    scores = torch.tensor([s for _, _, s in groups], dtype=torch.float32)
    return {
        "ranking_groups": len(groups),
        "ranking_k": k,
        "kendall_tau": float(torch.nanmean(kendall_tau(rewards, scores))),
        "top1_accuracy": float(top1_accuracy(rewards, scores).float().mean()),
        "pair_accuracy": float(torch.nanmean(pair_accuracy(rewards, scores))),
    }


LENGTH_GROWTH_FLAG = 1.2
"""A run whose answers are on average more than 20% longer than the SFT model's is flagged (DPO's best-known
failure: answers that get longer rather than better)."""


def generation_prompts(eval_frame: pd.DataFrame, cfg: EvaluateConfig, seed: int
                       ) -> tuple[list[str], bool, list[dict] | None]:
    """The held-out prompts both models answer, whether they are chat-rendered, and (judge ifeval) their rows: the
    demo judge's prompts (never trained on) with judge demo; IFEval's rows of evaluate.ifeval.prompts with judge
    ifeval (rendered by the model's template when it is answered); else the distinct prompts of the held-out pairs
    in a seeded order; `num_samples` of them, or `num_prompts` when a judge scores them."""
    import random

    count = max(cfg.num_samples, cfg.num_prompts if cfg.judge != "none" else 0)
    if cfg.judge == "demo":
        from lexalign.demo import task

        return task.eval_prompts(seed, count), False, None
    if cfg.judge == "ifeval":
        from lexalign.generation.prompts import read_prompt_file

        rows = read_prompt_file(cfg.ifeval["prompts"], "prompt", "evaluate.ifeval.prompts").rows
        random.Random(seed).shuffle(rows)
        rows = rows[:count]
        return [row["prompt"] for row in rows], False, rows
    prompts = sorted(set(eval_frame["prompt"])) if len(eval_frame) else []
    random.Random(seed).shuffle(prompts)
    return prompts[:count], tokens.chat_rendered(eval_frame), None


@dataclass
class Plan:
    """What one evaluation scores: the same in every process of one launched in several."""

    eval_frame: pd.DataFrame
    ranked: pd.DataFrame | None
    cfg: EvaluateConfig
    beta: float
    seed: int
    kl_prompts: list[str]
    """The held-out prompts the KL estimate samples answers to."""
    prompts: list[str]
    """The prompts both models answer greedily (and the judge judges)."""
    chat: bool
    """Whether `prompts` are chat-rendered."""
    rows: list[dict] | None = None
    """The prompts' rows as their file gives them (judge ifeval: IFEval's), rendered by the model's chat template
    when answered."""

    @classmethod
    def of(cls, eval_frame: pd.DataFrame, ranked: pd.DataFrame | None, cfg: EvaluateConfig, beta: float,
           seed: int) -> Plan:
        prompts, chat, rows = generation_prompts(eval_frame, cfg, seed)
        return cls(eval_frame, ranked if ranked is not None and len(ranked) else None, cfg, beta, seed,
                   sorted(set(eval_frame["prompt"]))[: cfg.num_prompts], prompts, chat, rows)


def evaluate(aligned: Path, reference: Path, eval_frame: pd.DataFrame, cfg: EvaluateConfig, beta: float,
             seed: int = 42, ranked_frame: pd.DataFrame | None = None, reward_model: Path | None = None,
             device: str = "cpu", share: Share | None = None) -> dict | None:
    """Every figure of one run against its reference model. `share` (a launched step, `lexalign.core.shares`): this
    process scores its share of every batch (log-probs, sampled and greedy answers, the reward model's scores),
    and the main process returns the figures of them all, equal to one process's; the others return None."""
    from lexalign.core.paths import require_model
    from lexalign.generation import judges

    share = share or Share()
    require_model(aligned, "lexalign align --config config/align.yaml")
    require_model(reference, "lexalign finetune --config config/finetune.yaml")
    judges.check(cfg, reward_model)  # a wrong judge fails now, not after the generations
    plan = Plan.of(eval_frame, ranked_frame, cfg, beta, seed)
    scores, mine, answers = model_scores(aligned, reference, plan, device, share)
    if device == "cuda":  # the models are gone: the reward model (judge reward_model) gets their memory
        import torch

        torch.cuda.empty_cache()
    if cfg.judge == "reward_model":
        rewards = judges.reward_model_rewards(reward_model, plan.prompts, *_texts(answers), plan.chat,
                                              cfg.batch_size, device, mine)
        scores.append(_named("rewards", rewards, mine))
    values = share.gather({k: v for pieces, _ in scores for k, v in pieces.items()},
                          {k: v for _, sizes in scores for k, v in sizes.items()})
    return None if values is None else figures(values, plan, aligned, reference, reward_model, device)


def model_scores(aligned: Path, reference: Path, plan: Plan, device: str, share: Share
                 ) -> tuple[list[tuple[dict, dict]], list[list[int]], tuple[list, list]]:
    """What the aligned and the reference model score, this process's share of it: the (pieces, sizes) of each
    measure, this process's generation batches, and its (SFT, aligned) answers. The models are freed on return."""
    from lexalign.generation.sampling import render_prompts
    from lexalign.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(aligned)
    policy = load_causal_lm(aligned, device).to(device).eval()
    ref = load_causal_lm(reference, device).to(device).eval()
    size = plan.cfg.batch_size
    scores = [held_out_scores(policy, ref, tokenizer, plan.eval_frame, size, share)]
    if plan.ranked is not None:
        scores.append(ranking_scores(policy, ref, tokenizer, plan.ranked, size, share))
    scores.append(kl_scores(policy, ref, tokenizer, plan.kl_prompts, plan.cfg.max_new_tokens, plan.seed, size,
                            tokens.chat_rendered(plan.eval_frame), share))
    mine = share.take(chunks(len(plan.prompts), size))
    prompts, chat = (plan.prompts, plan.chat) if plan.rows is None else render_prompts(tokenizer, plan.prompts)
    answers = tuple(generate_answers(model, tokenizer, prompts, plan.cfg.max_new_tokens, size, chat, mine)
                    for model in (ref, policy))
    scores.append(_named("answers", answers, mine))
    return scores, mine, answers


def _named(kind: str, values: tuple[list, list], batches: list[list[int]]) -> tuple[dict, dict]:
    """(SFT, aligned) values of this process's batches as the pieces `<kind>/sft` and `<kind>/aligned`."""
    pieces = {f"{kind}/{name}": piece(batches, found) for name, found in zip(("sft", "aligned"), values, strict=True)}
    return pieces, {name: len(values[0]) for name in pieces}


def _texts(answers: tuple[list, list]) -> tuple[list, list]:
    return tuple([a and a["text"] for a in rows] for rows in answers)


def figures(values: dict[str, list], plan: Plan, aligned: Path, reference: Path, reward_model: Path | None,
            device: str) -> dict:
    """The eval json from every process's values (the judge judges here, once)."""
    from lexalign.generation import judges

    cfg = plan.cfg
    result = {"aligned": str(aligned), "reference": str(reference), "beta": plan.beta,
              **held_out_figures(values, plan.eval_frame, plan.beta)}
    if plan.ranked is not None:
        result.update(ranking_figures(values, plan.ranked, plan.beta))
    kl = kl_figure(values["kl"], plan.seed) if values["kl"] else None
    result["kl_estimate"] = kl["mean"] if kl else None
    result["kl_interval"] = [kl["ci_low"], kl["ci_high"]] if kl else None
    result["kl_estimator"] = "k3" if kl else None
    answers = {name: values[f"answers/{name}"] for name in ("sft", "aligned")}
    sft, aligned_texts = _texts((answers["sft"], answers["aligned"]))
    result["decoding"] = {"strategy": "greedy", "max_new_tokens": cfg.max_new_tokens, "prompts": len(plan.prompts),
                          "chat_template": plan.chat}
    result["samples"] = [{"prompt": p, "sft": s, "aligned": a}
                         for p, s, a in list(zip(plan.prompts, sft, aligned_texts, strict=True))[: cfg.num_samples]]
    result["length"] = length_summary(answers)
    rewards = (values["rewards/sft"], values["rewards/aligned"]) if "rewards/sft" in values else None
    judged = judges.judge(cfg, plan.prompts, sft, aligned_texts, plan.chat, plan.seed, reward_model, device, rewards,
                          rows=plan.rows)
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
        low, high = result.get("kl_interval") or (None, None)
        interval = f" (95% interval {low:.3f} – {high:.3f})" if low is not None else ""
        lines.append(f"KL(aligned ‖ SFT) estimate per prompt: {result['kl_estimate']:.3f} nats{interval}")
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
