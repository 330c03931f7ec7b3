"""The rounds of on-policy alignment as pipeline steps (rules/online.smk; docs/online-plan.md).

Each function here is the body of one step of `lexalign.steps.training` (online_*):
prompts → generate → score → select → (the existing validation) → reference
(the sampled ids, never re-encoded) → (the existing align) → evaluate (against
SFT) → final. The settings are the config's `online` section, checked once by
`settings` (each round's alignment: `round_alignment`).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from lexalign.core import io
from lexalign.core.errors import LexAlignError


def selects(select: str, alignment: dict) -> bool:
    """Whether a round's `alignment` trains on what `select` makes (lexalign.methods says what each method reads):
    `best_worst` pairs, for a method reading pairs or unpaired rows (KTO: the best desirable, the worst not);
    `ranked` groups of K, for a method reading ranked groups of more than 2 (GDPO)."""
    from lexalign import methods

    method = methods.of(alignment)
    if select == "ranked":
        return method.group_size(alignment["group_delay_size"]) is not None
    return method.layout is not methods.Layout.RANKED


def round_alignment(online: dict, number: int) -> dict:
    """Round `number`'s alignment section (1-based): its item of the `online.alignment` list, the last item for
    every later round."""
    alignments = online["alignment"]
    return alignments[min(number, len(alignments)) - 1]


def round_name(online: dict, index: int) -> str:
    """Where item `index` (0-based) of online.alignment is in the config, and which rounds it sets, for messages."""
    count = len(online["alignment"])
    if not online["listed"]:
        return "online.alignment (every round)"
    rounds = f"round {index + 1}" + (" and every later round" if index == count - 1 and index + 1 < online["rounds"]
                                     else "")
    return f"online.alignment[{index}] ({rounds})"


def prompt_budget(online: dict, number: int) -> int | None:
    """The longest prompt round `number` samples from: online.max_prompt_tokens, or (null) what the round's
    alignment.max_length leaves after max_new_tokens, so a prompt and its completion are trained as sampled."""
    if online["max_prompt_tokens"] is not None:
        return online["max_prompt_tokens"]
    length = round_alignment(online, number)["max_length"]
    return None if length is None else max(length - online["sampling"]["max_new_tokens"], 0)


def round_sampling(online: dict, number: int) -> dict:
    """What shapes round `number`'s samples, and only that (the generate rule's params: the judge and the
    selection are not here, so changing them never samples again)."""
    return {**online["sampling"], "samples_per_prompt": online["samples_per_prompt"],
            "max_prompt_tokens": prompt_budget(online, number), "per_round": online["prompts"]["per_round"]}


def settings(config: dict) -> dict | None:
    """The `online` section with its defaults, checked against the alignment each round trains; None when
    absent/empty. `alignment` becomes the list of every round's full alignment section (one mapping: a list of
    one), `listed` says whether the config gave a list."""
    from lexalign.config.loader import section_defaults
    from lexalign.config.sections import AlignConfig, run_alignment

    section = config.get("online")
    if not section:
        return None
    online = section_defaults("online", section)
    online["prompts"] = section_defaults("online", {"rounds": 1, "prompts": online["prompts"]})["prompts"]
    online["listed"] = isinstance(online["alignment"], list)
    written = online["alignment"] if online["listed"] else [online["alignment"]]
    online["alignment"] = written
    alignments = []
    for index, overrides in enumerate(written):
        where = round_name(online, index)
        try:
            alignment = run_alignment(config["alignment"], overrides,
                                      where=where.split(" ")[0] if online["listed"] else "online.alignment")
            AlignConfig.from_dict(alignment)
        except LexAlignError as err:
            err.details = [*err.details, f"In {where}"]
            raise
        alignments.append(alignment)
    online["alignment"] = alignments
    problems = []
    k = online["samples_per_prompt"]
    for index, alignment in enumerate(alignments):
        where, method = round_name(online, index), alignment["method"]
        if online["select"] == "best_worst" and not selects("best_worst", alignment):
            problems.append(f"{where}: select best_worst trains pairs (or KTO's unpaired rows), which method "
                            f"{method} does not read: use select ranked, or a pair method")
        if online["select"] == "ranked" and not (selects("ranked", alignment)
                                                 and alignment["group_delay_size"] <= k):
            problems.append(f"{where}: select ranked trains GDPO on ranked groups: it needs method gdpo with "
                            f"2 < group_delay_size <= samples_per_prompt ({k}) (it is method {method}, "
                            f"group_delay_size {alignment['group_delay_size']})")
        length, new = alignment["max_length"], online["sampling"]["max_new_tokens"]
        budget = None if length is None else length - new
        wanted = online["max_prompt_tokens"]
        if budget is not None and (budget < 1 or (wanted is not None and wanted > budget)):
            problems.append(f"{where}: a prompt of max_prompt_tokens ({wanted or 'none left'}) and max_new_tokens "
                            f"({new}) must fit the round's alignment.max_length ({length}): training would cut "
                            f"the sampled tokens")
    prompts = online["prompts"]
    if prompts["from"] == "path" and not prompts["path"]:
        problems.append("online.prompts.from is path, but online.prompts.path is not set")
    if online["judge"] == "reward_model" and not (config["evaluate"]["reward_model"] or {}).get("repo_id") \
            and not (config["evaluate"]["reward_model"] or {}).get("path"):
        problems.append("online.judge reward_model reads evaluate.reward_model, which names no model")
    if online["judge"] == "llm" and not (config["evaluate"]["llm_judge"].get("base_url")
                                          and config["evaluate"]["llm_judge"].get("model")):
        problems.append("online.judge llm reads evaluate.llm_judge, which needs base_url and model")
    if problems:
        raise LexAlignError("Invalid online section", *problems, hint="Fix the online section of the config "
                            "(docs/online-plan.md)")
    return online


# --- prompts --------------------------------------------------------------------------------------------------


def read_prompt_file(path: Path, field: str) -> list:
    import pandas as pd

    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_json(path, lines=path.suffix == ".jsonl")
    if field not in frame.columns:
        raise LexAlignError(f'The prompt file "{path}" has no field "{field}"',
                            f"Its fields: {', '.join(map(str, frame.columns))}",
                            hint="Set online.prompts.prompt_field")
    return frame[field].tolist()


def write_prompts(output: str | Path, prompts: dict, seed: int, data: str | Path | None = None) -> dict:
    """Every prompt of the source, distinct, in one seeded order (rounds take consecutive slices of it, so the
    file depends on neither `rounds` nor `per_round`: raising them replans no earlier round)."""
    rendered = False
    if prompts["from"] == "demo":
        from lexalign.demo import task

        # Already in the demo's own "User: ...\nAssistant:" frame, as SFT trained it: taken as they are.
        texts, rendered = [text for _, text in task.TRAIN_PROMPTS], True
    elif prompts["from"] == "preference_data":
        import pandas as pd

        from lexalign.core.tokens import CHAT_ATTR

        texts = pd.read_parquet(Path(data) / "train.parquet")["prompt"].astype(str).tolist()
        rendered = bool(io.read_json(Path(data) / "report.json").get(CHAT_ATTR, False))  # as stages.data_is_chat
    else:
        texts = read_prompt_file(Path(prompts["path"]), prompts["prompt_field"])
    distinct = list({json.dumps(t, sort_keys=True): t for t in texts}.values())
    random.Random(seed).shuffle(distinct)
    if not distinct:
        raise LexAlignError(f"No prompts in the online prompt source ({prompts['from']})")
    count = held_out_count(prompts, len(distinct)) if _needs_held_out(prompts, data) else 0
    if count >= len(distinct):
        raise LexAlignError(f"online.prompts.held_out is {count}, but the prompt source has {len(distinct)} distinct "
                            "prompts: none would be left to sample", hint="Lower online.prompts.held_out")
    sampled, held = distinct[:len(distinct) - count], distinct[len(distinct) - count:]
    io.write_json(output, {"rendered": rendered, "prompts": sampled, "held_out": held})
    print(f"Online prompts: {len(sampled)} distinct to sample ({len(texts)} read) from {prompts['from']}"
          f"{f', {len(held)} more held out for evaluation' if held else ''} → {output}", flush=True)
    return {"prompts": len(sampled), "held_out": len(held)}


def _needs_held_out(prompts: dict, data) -> bool:
    """A source without held-out prompts of its own: a prompt file, or preference data with no eval split."""
    if prompts["from"] == "path":
        return True
    if prompts["from"] == "preference_data" and data:
        import pandas as pd

        return not len(pd.read_parquet(Path(data) / "eval.parquet", columns=["prompt"]))
    return False


def held_out_count(prompts: dict, distinct: int) -> int:
    """How many of `distinct` prompts are set aside for evaluation: online.prompts.held_out, or (null) a tenth,
    at least one of two or more."""
    if prompts.get("held_out") is not None:
        return prompts["held_out"]
    return max(distinct // 10, 1) if distinct >= 2 else 0


def round_prompts(prompts: dict, number: int, per_round: int | None) -> list:
    """Round `number`'s slice (1-based): the next `per_round` prompts, cycling; all of them with None."""
    everything = prompts["prompts"]
    if not per_round:
        return list(everything)
    start = (number - 1) * per_round
    return [everything[(start + i) % len(everything)] for i in range(per_round)]


# --- generate, score, select ----------------------------------------------------------------------------------


def generate_round(model, prompts, output, number: int, sampling: dict, device: str, shard=None,
                   throughput=None) -> dict | None:
    """Round `number`'s generations into `output`. `shard` (a launched step, scale.generate: lexalign.core.shares): each
    process samples its shards (shard n is process n % N's), and after a barrier the main process joins them and
    returns the report; the others return None."""
    from lexalign.core.shares import Shard
    from lexalign.generation.sampling import Sampling, generate
    from lexalign.models.loading import resolve_device

    shard = shard or Shard(output=Path(output))
    source = io.read_json(prompts)
    knobs = {key: sampling[key] for key in ("temperature", "top_p", "max_new_tokens", "seed")}
    # Each round its own seed: the same prompts (per_round null) must not draw the same samples every round.
    knobs["seed"] += number - 1
    # Shards go to a folder beside the output: Snakemake deletes a failed job's output, a rerun resumes from them.
    work = Path(output).parent / ".generations-work"

    def run(process: tuple[int, int]) -> dict:
        return generate(model, round_prompts(source, number, sampling["per_round"]), work,
                        Sampling(samples_per_prompt=sampling["samples_per_prompt"], **knobs),
                        batch_size=sampling["batch_size"], device=resolve_device(device), rendered=source["rendered"],
                        max_prompt_tokens=sampling["max_prompt_tokens"], shard_prompts=sampling["shard_prompts"],
                        engine=sampling.get("engine", "hf"),
                        process=process)

    made = 0
    if shard.world > 1:
        own = run((shard.rank, shard.world))
        print(f"[rank {shard.rank}/{shard.world}] sampled {own['shards_generated']} of the {own['shards']} "
              "shards", flush=True)
        # The barrier: every process's shards are on disk (and how many each made, for the report).
        counts = shard.gather({"shards": {"rows": [shard.rank], "values": [own["shards_generated"]]}},
                              {"shards": shard.world})
        if counts is None:
            return None  # not the main process: it joins the shards
        made = sum(counts["shards"])
    report = run((0, 1))  # every shard is there: the join loads no model
    if shard.world > 1 and not report.get("resumed"):
        report = {**report, "shards_generated": report["shards_generated"] + made, "processes": shard.world}
        io.write_json(work / "report.json", report)
    shutil.rmtree(output, ignore_errors=True)
    work.replace(output)
    if throughput:
        # Summed over the shards' own timings (so a resumed job counts each shard once, at the speed it ran);
        # per process when several sampled.
        io.write_json(throughput, {"round": number, "tokens_per_second": report["tokens_per_second"],
                                   "seconds": report["seconds"], "completions": report["completions"],
                                   "mean_completion_tokens": report["mean_completion_tokens"],
                                   "engine": sampling.get("engine", "hf"), "processes": shard.world,
                                   "shards_generated_now": report["shards_generated"], "shards": report["shards"]})
    spread = f" by {shard.world} processes" if shard.world > 1 else ""
    print(f"Round {number}: {report['completions']} completions of {report['kept']} prompts "
          f"({report['skipped_too_long']} skipped as too long, {report['truncated']} truncated; "
          f"{report['shards_generated']} of {report['shards']} shards sampled now{spread}, the others by an earlier "
          f"attempt) → {output}", flush=True)
    return report


def make_judge(judge: str, chat: bool, reward_model, llm_judge: dict, device: str):
    from lexalign.generation import scoring as score

    if judge == "demo":
        return score.DemoJudge()
    if judge == "reward_model":
        from lexalign.models.loading import resolve_device

        return score.RewardModelJudge(reward_model, chat, resolve_device(device))
    return score.LlmJudge(llm_judge)


def score_round(generations, output, judge: str, cache, reward_model=None, llm_judge=None, device="cpu",
                shard=None) -> dict | None:
    """The judge's score of every completion of a round into `output`. `shard` (a launched step, scale.score):
    the reward model's batches are dealt over the processes and the main process writes the output and returns
    the counts; the others return None. The demo and LLM judges score in the main process alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lexalign.core.shares import Shard
    from lexalign.generation.sampling import read_generations
    from lexalign.generation.scoring import score_completions

    shard = shard or Shard(output=Path(output))
    if judge != "reward_model" and shard.world > 1:
        if not shard.main:
            return None
        shard = Shard(output=Path(output))
    rows = read_generations(generations).to_pylist()
    chat = bool(io.read_json(Path(generations) / "report.json").get("chat"))
    scored = score_completions(rows, make_judge(judge, chat, reward_model, llm_judge or {}, device), cache,
                               shard=shard)
    if scored is None:
        return None  # not the main process: it writes the scores
    scores, counts = scored
    flat = [s for group in scores for s in group if s is not None]
    counts["mean_score"] = sum(flat) / len(flat) if flat else None
    table = pa.table({"row": [r["row"] for r in rows], "scores": pa.array(scores, type=pa.list_(pa.float64()))},
                     metadata={b"lexalign.scores": json.dumps(counts).encode()})
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, output)
    spread = f" by {shard.world} processes" if shard.world > 1 else ""
    print(f"Scores ({judge}): {counts['completions']} completions, {counts['asked']} asked{spread}, "
          f"{counts['cached']} cached, {counts['unscored']} unscored, mean {counts['mean_score']} → {output}",
          flush=True)
    return counts


def select_round(generations, scores, output, report, select: dict) -> dict:
    import pyarrow.parquet as pq

    from lexalign.generation import selection as choose
    from lexalign.generation.sampling import read_generations

    rows = read_generations(generations).to_pylist()
    by_row = dict(zip(*(pq.read_table(scores).column(c).to_pylist() for c in ("row", "scores")), strict=True))
    for row in rows:
        row["scores"] = by_row[row["row"]]
    keep = select["truncated"] == "keep"
    if select["select"] == "ranked":
        records, counts = choose.ranked(rows, select["group_size"], keep)
    else:
        records, counts = choose.best_worst(rows, keep)
    generated = io.read_json(Path(generations) / "report.json")
    counts.update(skipped_too_long=generated["skipped_too_long"], skipped_empty=generated["skipped_empty"],
                  truncated=generated["truncated"], completions=generated["completions"])
    flat = [s for row in rows for s in row["scores"] if s is not None]
    counts["mean_score"] = sum(flat) / len(flat) if flat else None
    if not records:
        raise LexAlignError("The round selected nothing to train on", json.dumps(counts),
                            hint="Sample more prompts or completions (ties and truncated ones are dropped)")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    # One record a line, in order: validation's source_row is the line, validated_token_table finds the ids by it.
    Path(output).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    io.write_json(report, counts)
    print(f"Selection ({select['select']}): " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    return counts


# --- the reference of a round: the sampled ids -----------------------------------------------------------------


def sampled_token_tables(train, evals, selection, layout: str) -> dict:
    """Each split's token table from the ids the selection was sampled with, in the reference step's group order
    (`reference.split_groups`), so the reference log-probs and the trainer read exactly the sampled tokens."""
    from lexalign.train.trainer_data import read_selection, sampled_token_table

    records = read_selection(selection)
    return {name: sampled_token_table(frame, layout, records) for name, frame in (("train", train), ("eval", evals))}


# --- how each round's model does against the SFT model ----------------------------------------------------------


def held_out_prompts(prompts: dict, source, data, seed: int, count: int) -> tuple[list, bool, bool]:
    """(prompts, whether they are rendered already, whether no round trains on them) for a round's evaluation:
    the demo's held-out prompts; the validated preference data's eval prompts; else (a prompt file, or no eval
    split) the prompts write_prompts set aside (online.prompts.held_out), or with none set aside the first
    prompts of the rounds' order, which a round may have sampled (said in eval.json)."""
    if prompts["from"] == "demo":
        from lexalign.demo import task

        return task.eval_prompts(seed, count), True, True
    if prompts["from"] == "preference_data" and data:
        import pandas as pd

        from lexalign.core.tokens import CHAT_ATTR

        evals = pd.read_parquet(Path(data) / "eval.parquet")
        if len(evals):
            chosen = sorted(set(evals["prompt"].astype(str)))
            random.Random(seed).shuffle(chosen)
            return chosen[:count], bool(io.read_json(Path(data) / "report.json").get(CHAT_ATTR, False)), True
    everything = io.read_json(source)
    if everything.get("held_out"):  # set aside by write_prompts: no round sampled them
        return everything["held_out"][:count], everything["rendered"], True
    return everything["prompts"][:count], everything["rendered"], False


def evaluate_round(model, sft, reference, prompts, output, number: int, evaluate: dict, held_out: dict,
                   reference_name: str, seed: int = 42, data=None, reward_model=None, device: str = "cpu") -> dict:
    """Round `number`'s model against the SFT model on held-out prompts, greedy (`lexalign.evaluation.figures`'s pieces,
    as the evaluate step): the judge's win rate with its bootstrap interval and both models' mean judged score, the
    answer lengths, and the Monte Carlo KL(round model ‖ the round's reference) on samples of the round model."""
    from lexalign.config.sections import EvaluateConfig
    from lexalign.evaluation.figures import generate_answers, kl_estimate, length_summary
    from lexalign.generation import judges
    from lexalign.generation.sampling import render_prompts
    from lexalign.models.loading import load_causal_lm, load_tokenizer, resolve_device

    device = resolve_device(device)
    cfg = EvaluateConfig.from_dict(evaluate)
    judges.check(cfg, reward_model)  # a wrong judge fails now, not after the generations
    texts, rendered, unseen = held_out_prompts(held_out, prompts, data, seed, cfg.num_prompts)
    tokenizer = load_tokenizer(model)
    texts, chat = render_prompts(tokenizer, texts, rendered)
    policy = load_causal_lm(model, device).to(device).eval()
    baseline = load_causal_lm(sft, device).to(device).eval()
    answers = {name: generate_answers(m, tokenizer, texts, cfg.max_new_tokens, cfg.batch_size, chat)
               for name, m in (("sft", baseline), ("aligned", policy))}
    held_to = baseline if Path(reference).resolve() == Path(sft).resolve() else \
        load_causal_lm(reference, device).to(device).eval()
    kl = kl_estimate(policy, held_to, tokenizer, texts, cfg.max_new_tokens, seed, cfg.batch_size, chat)
    del policy, baseline, held_to
    sft_texts, aligned_texts = ([a["text"] for a in answers[name]] for name in ("sft", "aligned"))
    result = {"round": number, "model": str(model), "sft": str(sft), "reference": str(reference),
              "reference_name": reference_name, "prompts": len(texts), "held_out": unseen,
              "decoding": {"strategy": "greedy", "max_new_tokens": cfg.max_new_tokens, "chat_template": chat},
              "judge": judges.judge(cfg, texts, sft_texts, aligned_texts, chat, seed, reward_model, device),
              "length": length_summary(answers), "kl_to_reference": kl,
              "samples": [{"prompt": p, "sft": s, "aligned": a} for p, s, a in
                          list(zip(texts, sft_texts, aligned_texts, strict=True))[:cfg.num_samples]]}
    io.write_json(output, result)
    judged = result["judge"] or {}
    print(f"Round {number} against SFT on {len(texts)} {'held-out ' if unseen else ''}prompts: win rate "
          f"{judged.get('win_rate')} ({judged.get('ci_low')} – {judged.get('ci_high')}), judged mean "
          f"{judged.get('mean_reward_sft')} → {judged.get('mean_reward_aligned')}, KL to {reference_name} {kl:.4f}"
          f" → {output}", flush=True)
    return result


def finish(model, rounds: list[str], output) -> dict:
    """The last round's model copied into `output`, its lineage naming every round (generations' policy, judge,
    selection counts, validated rows)."""
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
