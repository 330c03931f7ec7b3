"""The steps of on-policy alignment in rounds (rules/online.smk; docs/online-plan.md).

Round r: prompts → generate (K completions per prompt from round r-1's model, SFT first) → score (the judge) →
select (pairs or ranked groups) → the offline validate step → reference (of the sampled ids, never re-encoded)
→ the offline align step → evaluate (against SFT); after the last round, final. The settings are the config's
`online` section, checked as the workflow is planned (lexalign.config.online); each round's rule passes its own.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

from lexalign.core import io
from lexalign.core.errors import LexAlignError, warn
from lexalign.steps import one


def online_prompts(*, output: str | Path, prompts: dict, seed: int = 42, data: str | Path | list | None = None
                   ) -> dict:
    """Every prompt of the `online.prompts` source, distinct and in one seeded order, into `output` (json), with
    the held-out prompts set aside; `data`: the validated preference data (prompts from: preference_data; a
    one-element list from the rule). Rounds take consecutive slices of the order, so the file depends on neither
    `rounds` nor `per_round`: raising them replans no earlier round."""
    from lexalign.generation.prompts import REJECTS_KEPT, collect_prompts

    collected = collect_prompts(prompts, seed, one(data))
    io.write_json(output, {"rendered": collected.rendered, "prompts": collected.sampled,
                           "held_out": collected.held_out, "rejected": collected.rejected,
                           "rejects": collected.rejects, "fields": collected.fields, "plain": collected.plain})
    held = f", {len(collected.held_out)} more held out for evaluation" if collected.held_out else ""
    print(f"Online prompts: {len(collected.sampled)} distinct to sample ({collected.read} read) from "
          f"{prompts['from']}{held} → {output}", flush=True)
    if collected.rejected:
        first = collected.rejects[0]
        warn(f"{sum(collected.rejected.values())} rows of {prompts['path']} rejected: "
             + ", ".join(f"{reason} {n}" for reason, n in sorted(collected.rejected.items())),
             f"The first: row {first['row']} of {first['file']} ({first['reason']}: {first['detail']}); "
             f"they are listed in {output} (the first {REJECTS_KEPT})")
    return {"prompts": len(collected.sampled), "held_out": len(collected.held_out),
            **({"rejected": collected.rejected} if collected.rejected else {})}


def online_generate(*, model: str | Path, prompts: str | Path, output: str | Path, number: int, sampling: dict,
                    device: str = "auto", throughput: str | Path | None = None) -> dict | None:
    """Round `number`'s K completions per prompt from `model` (the previous round's, or SFT), as sampled ids, in
    resumable shards; `throughput` (json, beside the rule's benchmark): its generation tokens per second.
    Launched in several processes (scale.generate), each samples its share of the shards (shard n is process
    n % N's); after a barrier the main process joins them, writes the outputs and returns the report; the others
    return None (lexalign.core.shares)."""
    from lexalign.core.shares import session
    from lexalign.generation.prompts import round_prompts
    from lexalign.generation.sampling import Sampling, generate
    from lexalign.models.loading import resolve_device

    source = io.read_json(prompts)
    knobs = {key: sampling[key] for key in ("temperature", "top_p", "max_new_tokens", "seed")}
    knobs["dtype"] = sampling.get("dtype")
    # Each round its own seed: the same prompts (per_round null) must not draw the same samples every round.
    knobs["seed"] += number - 1
    # Shards go to a folder beside the output: Snakemake deletes a failed job's output, a rerun resumes from them.
    work = Path(output).parent / ".generations-work"

    def sample(process: tuple[int, int]) -> dict:
        return generate(model, round_prompts(source, number, sampling["per_round"]), work,
                        Sampling(samples_per_prompt=sampling["samples_per_prompt"], **knobs),
                        batch_size=sampling["batch_size"], device=resolve_device(device), rendered=source["rendered"],
                        max_prompt_tokens=sampling["max_prompt_tokens"], shard_prompts=sampling["shard_prompts"],
                        engine=sampling.get("engine", "hf"), process=process)

    with session(output) as share:
        made = 0
        if share.world > 1:
            own = sample((share.rank, share.world))
            print(f"[rank {share.rank}/{share.world}] sampled {own['shards_generated']} of the {own['shards']} "
                  "shards", flush=True)
            # The barrier: every process's shards are on disk (and how many each made, for the report).
            counts = share.gather({"shards": {"rows": [share.rank], "values": [own["shards_generated"]]}},
                                  {"shards": share.world})
            if counts is None:
                return None  # not the main process: it joins the shards
            made = sum(counts["shards"])
        report = sample((0, 1))  # every shard is there: the join loads no model
        if share.world > 1 and not report.get("resumed"):
            report = {**report, "shards_generated": report["shards_generated"] + made, "processes": share.world}
            io.write_json(work / "report.json", report)
        shutil.rmtree(output, ignore_errors=True)
        work.replace(output)
        if throughput:
            # Summed over the shards' own timings (so a resumed job counts each shard once, at the speed it ran);
            # per process when several sampled.
            io.write_json(throughput, {"round": number, "tokens_per_second": report["tokens_per_second"],
                                       "seconds": report["seconds"], "completions": report["completions"],
                                       "mean_completion_tokens": report["mean_completion_tokens"],
                                       "engine": sampling.get("engine", "hf"), "processes": share.world,
                                       "shards_generated_now": report["shards_generated"], "shards": report["shards"]})
        spread = f" by {share.world} processes" if share.world > 1 else ""
        print(f"Round {number}: {report['completions']} completions of {report['kept']} prompts "
              f"({report['skipped_too_long']} skipped as too long, {report['truncated']} truncated; "
              f"{report['shards_generated']} of {report['shards']} shards sampled now{spread}, the others by an "
              f"earlier attempt) → {output}", flush=True)
        return report


def online_score(*, generations: str | Path, output: str | Path, judge: str | dict, cache: str | Path,
                 prompts: str | Path | list | None = None, reward_model: str | Path | list | None = None,
                 llm_judge: dict | None = None, nltk_data: str | None = None, device: str = "auto") -> dict | None:
    """The judge's score of every completion of a round into `output` (each asked once: `cache`). `prompts`: the
    rounds' prompts.json, whose rows' other fields the ifeval judge and a reward function of the user's read.
    Launched in several processes (scale.score; judge reward_model), each scores its share of the batches and the
    main process writes the output and returns the counts; the others return None. The other judges score in the
    main process alone (lexalign.core.shares)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lexalign.core.shares import Share, session
    from lexalign.generation.completion_scores import make_judge, score_completions
    from lexalign.generation.sampling import read_generations

    with session(output) as share:
        if judge != "reward_model" and share.world > 1:
            if not share.main:
                return None
            share = Share(output=Path(output))
        rows = read_generations(generations).to_pylist()
        chat = bool(io.read_json(Path(generations) / "report.json").get("chat"))
        fields = io.read_json(one(prompts)).get("fields", {}) if one(prompts) else {}
        scorer = make_judge(judge, chat, one(reward_model), llm_judge or {}, device, fields, nltk_data)
        scored = score_completions(rows, scorer, cache, share=share)
        if scored is None:
            return None  # not the main process: it writes the scores
        scores, counts = scored
        flat = [s for group in scores for s in group if s is not None]
        counts["mean_score"] = sum(flat) / len(flat) if flat else None
        table = pa.table({"row": [r["row"] for r in rows], "scores": pa.array(scores, type=pa.list_(pa.float64()))},
                         metadata={b"lexalign.scores": json.dumps(counts).encode()})
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, output)
        spread = f" by {share.world} processes" if share.world > 1 else ""
        print(f"Scores ({scorer.name}): {counts['completions']} completions, {counts['asked']} asked{spread}, "
              f"{counts['cached']} cached, {counts['unscored']} unscored, mean {counts['mean_score']} → {output}",
              flush=True)
        return counts


def online_select(*, generations: str | Path, scores: str | Path, output: str | Path, report: str | Path,
                  select: dict) -> dict:
    """The round's training rows (JSON Lines, with the sampled ids) and its counts (`report`)."""
    import pyarrow.parquet as pq

    from lexalign.generation.sampling import read_generations
    from lexalign.generation.selection import best_worst, ranked

    rows = read_generations(generations).to_pylist()
    by_row = dict(zip(*(pq.read_table(scores).column(c).to_pylist() for c in ("row", "scores")), strict=True))
    for row in rows:
        row["scores"] = by_row[row["row"]]
    keep = select["truncated"] == "keep"
    if select["select"] == "ranked":
        records, counts = ranked(rows, select["group_size"], keep)
    else:
        records, counts = best_worst(rows, keep)
    generated = io.read_json(Path(generations) / "report.json")
    counts.update(skipped_too_long=generated["skipped_too_long"], skipped_empty=generated["skipped_empty"],
                  truncated=generated["truncated"], completions=generated["completions"])
    flat = [s for row in rows for s in row["scores"] if s is not None]
    counts["mean_score"] = sum(flat) / len(flat) if flat else None
    if not records:
        raise LexAlignError("The round selected nothing to train on", json.dumps(counts),
                            hint="Sample more prompts or completions (ties and truncated ones are dropped)")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    # One record a line, in order: validation's source_row is the line, the reference step finds the ids by it.
    Path(output).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    io.write_json(report, counts)
    print(f"Selection ({select['select']}): " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    return counts


def online_reference(*, model: str | Path, data: str | Path, selection: str | Path, output: str | Path,
                     setting: dict, device: str = "auto", trust_remote_code: bool = False) -> dict | None:
    """The reference log-probs of a round's validated data, of the ids that were sampled (never re-encoded).
    Launched in several processes (scale.reference, as the offline reference step), each scores its share and
    the main process writes the file and returns the summary; the others return None."""
    from lexalign.core.shares import session
    from lexalign.data.validated import read_validated
    from lexalign.models.loading import resolve_device
    from lexalign.reference.scoring import compute_reference
    from lexalign.train.trainer_data import read_selection, sampled_token_table

    train, evals = read_validated(data, gated=True)
    records = read_selection(selection)
    tables = {name: sampled_token_table(frame, setting["layout"], records)
              for name, frame in (("train", train), ("eval", evals))}
    with session(output) as share:
        summary = compute_reference(model, train, evals, output, layout=setting["layout"],
                                    max_length=setting["max_length"], truncation_mode=setting["truncation_mode"],
                                    device=resolve_device(device), load_in_4bit=setting["load_in_4bit"],
                                    trust_remote_code=trust_remote_code, token_tables=tables, share=share,
                                    bf16=setting.get("bf16"))
    if summary is None:
        return None  # not the main process: it writes the file and says so
    spread = f" over {summary['processes']} processes" if summary["processes"] > 1 else ""
    print(f"Reference log-probs of the sampled ids: {summary['train_groups']} train + {summary['eval_groups']} eval "
          f"groups{spread} → {output}", flush=True)
    return summary


def online_evaluate(*, model: str | Path, sft: str | Path, reference: str | Path, prompts: str | Path,
                    output: str | Path, number: int, evaluate: dict, held_out: dict, reference_name: str,
                    seed: int = 42, data: str | Path | list | None = None,
                    reward_model: str | Path | list | None = None, device: str = "auto",
                    cache_dir: str | Path | None = None) -> dict:
    """Round `number`'s model against the SFT model on held-out prompts, greedy (the evaluate step's pieces): the
    judge's win rate with its bootstrap interval and both models' mean judged score, the answer lengths, and the
    Monte Carlo KL(round model ‖ the round's reference) on samples of the round model, into `output` (json).
    `cache_dir`: the SFT model's answers are kept there, so only the first round decodes them."""
    from lexalign.config.sections import EvaluateConfig
    from lexalign.evaluation.answers import cached_answers, generate_answers, kl_estimate, length_summary
    from lexalign.generation import judges
    from lexalign.generation.prompts import held_out_prompts
    from lexalign.generation.sampling import question, render_prompts
    from lexalign.models.loading import load_causal_lm, load_tokenizer, resolve_device

    data, reward_model = one(data), one(reward_model)
    device = resolve_device(device)
    cfg = EvaluateConfig.from_dict(evaluate)
    judges.check(cfg, reward_model)  # a wrong judge fails now, not after the generations
    written, rendered, unseen = held_out_prompts(held_out, prompts, data, seed, cfg.num_prompts)
    source = io.read_json(prompts)
    fields = source.get("fields") or {}
    rows = [{"prompt": question(p), **fields.get(question(p), {})} for p in written] if fields else None
    tokenizer = load_tokenizer(model)
    texts, chat = render_prompts(tokenizer, written, rendered)
    plain, _ = render_prompts(tokenizer, source.get("plain") or [], False)
    policy = load_causal_lm(model, device).to(device).eval()
    baseline = load_causal_lm(sft, device).to(device).eval()
    decoding = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "chat": chat}

    def answered(m, prompts):
        return generate_answers(m, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, chat)

    # The SFT model's answers are the same every round (same prompts, greedy): decoded once, then read back.
    start = {}
    for name, prompts in (("held-out", texts), ("plain", plain)):
        start[name], hit = cached_answers(cache_dir, sft, model, device, prompts, decoding,
                                          functools.partial(answered, baseline))
        if hit:
            print(f"The SFT model's answers to the {len(prompts)} {name} prompts: from the cache ({cache_dir})",
                  flush=True)
    answers = {"sft": start["held-out"], "aligned": answered(policy, texts)}
    plain_answers = {"sft": start["plain"], "aligned": answered(policy, plain)} if plain else None
    held_to = baseline if Path(reference).resolve() == Path(sft).resolve() else \
        load_causal_lm(reference, device).to(device).eval()
    kl = kl_estimate(policy, held_to, tokenizer, texts, cfg.max_new_tokens, seed, cfg.batch_size, chat)
    del policy, baseline, held_to
    sft_texts, aligned_texts = ([a["text"] for a in answers[name]] for name in ("sft", "aligned"))
    result = {"round": number, "model": str(model), "sft": str(sft), "reference": str(reference),
              "reference_name": reference_name, "prompts": len(texts), "held_out": unseen,
              "decoding": {"strategy": "greedy", "max_new_tokens": cfg.max_new_tokens, "chat_template": chat},
              "judge": judges.judge(cfg, texts, sft_texts, aligned_texts, chat, seed, reward_model, device,
                                    rows=rows),
              "length": length_summary(answers), "kl_to_reference": kl["mean"],
              "kl_to_reference_interval": [kl["ci_low"], kl["ci_high"]], "kl_estimator": kl["estimator"],
              "samples": [{"prompt": p, "sft": s, "aligned": a} for p, s, a in
                          list(zip(texts, sft_texts, aligned_texts, strict=True))[:cfg.num_samples]],
              # Questions without instructions (MT-Bench's), answered by both models: did the rounds break them?
              "plain_samples": [{"prompt": q, "sft": s["text"], "aligned": a["text"], "sft_tokens": s["tokens"],
                                 "aligned_tokens": a["tokens"]} for q, s, a in
                                zip(source.get("plain") or [], *plain_answers.values(), strict=True)]
              if plain_answers else []}
    io.write_json(output, result)
    judged = result["judge"] or {}
    print(f"Round {number} against SFT on {len(texts)} {'held-out ' if unseen else ''}prompts: win rate "
          f"{judged.get('win_rate')} ({judged.get('ci_low')} – {judged.get('ci_high')}), judged mean "
          f"{judged.get('mean_reward_sft')} → {judged.get('mean_reward_aligned')}, KL to {reference_name} "
          f"{kl['mean']:.4f}"
          f" → {output}", flush=True)
    return result


def online_final(*, model: str | Path, rounds: list[str], output: str | Path) -> dict:
    """The last round's model copied into `output`, its lineage naming every round (generations' policy, judge,
    selection counts, validated rows, evaluation)."""
    from lexalign.core.lineage import stage_record, write_lineage
    from lexalign.evaluation.report import round_figures

    history = []
    for number, folder in enumerate(map(Path, rounds), start=1):
        generated = io.read_json(folder / "generations" / "report.json")
        history.append({"round": number, "policy": generated["policy"], "policy_hash": generated["policy_hash"],
                        "sampling": generated["sampling"], "generations": {k: generated[k] for k in (
                            "prompts", "kept", "skipped_too_long", "completions", "truncated")},
                        "selection": io.read_json(folder / "selection.json"),
                        "preferences": {k: io.read_json(folder / "preferences" / "report.json").get(k)
                                        for k in ("kept_rows", "rejected_rows", "train_rows", "eval_rows")},
                        "model": str(folder / "model"), "model_sha256": io.hash_path(folder / "model"),
                        "evaluation": round_figures(folder)["evaluation"]})
    output = Path(output)
    shutil.copytree(model, output)
    write_lineage(output, stage_record("online", {"rounds": len(rounds)}, {"model": model},
                                       extra={"rounds": history}))
    print(f"Online: {len(rounds)} rounds; mean judged score of each round's samples: "
          + ", ".join(f"{h['selection'].get('mean_score')}" for h in history) + "; win rate against SFT after each: "
          + ", ".join(f"{h['evaluation'].get('win_rate')}" for h in history) + f" → {output}", flush=True)
    return {"rounds": history}
