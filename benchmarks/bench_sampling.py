"""Benchmark (not a test): an online round's sampler (`lexalign.generation.sampling.sample`, LexAlign's sampler in
`lexalign.generation.fast_sampling`) against a plain `model.generate` loop, on SmolLM2-135M-Instruct, side by side.

    .venv/bin/python benchmarks/bench_sampling.py --model /tmp/research/gguf/smollm2-135m-instruct
    .venv/bin/python benchmarks/bench_sampling.py --model ... --repeats 1 --prompts 12      # quick
    .venv/bin/python benchmarks/bench_sampling.py --model ... --bf16                        # + generate() in bf16
    .venv/bin/python benchmarks/bench_sampling.py --model ... --profile                     # where the time goes

Both arms get the same model object (float32, as `load_causal_lm` loads it on the CPU), the same prompts (IFEval-
style instructions of `lexalign.generation.instruction_set.prompt_set`, rendered by the model's chat template, as
a round renders them), in the same batches (`--batch` prompts, longest first, left padded), K = `--samples`,
temperature 1, top_p 1, no top_k, `--max-new-tokens`, stopping at the model's end ids:

* `plain`: `model.generate(..., do_sample=True, num_return_sequences=K)` per batch;
* `lexalign`: `sample_batches(model, tokenizer, batches, Sampling(...), seeds)`, as a round's generate job calls it
  on a shard (the batches as one queue in one batch's K x `--batch` rows);
* `lexalign-per-batch` (with --ablation): `sample(...)` one batch at a time (no prompt takes another batch's rows);
* `lexalign-auto`: the same as the smollm2 example's rounds sample (`online.sampling.dtype: auto`: a bfloat16
  copy where the CPU multiplies bf16 in hardware, avx512_bf16 or AMX; the model as loaded elsewhere: then this arm
  is `lexalign` again). A cast samples from a slightly different distribution than the float32 policy's;
* `plain-bf16` (with --bf16): generate() on that bfloat16 copy, to tell the sampler's share from the dtype's.

Tokens are real generated tokens: each completion through its end id, no padding after it. Each repeat runs every
arm once, the order alternating; the figures are tokens per second of each, and the ratio per repeat and its
median. `uptime`'s load is printed before and after: on a shared machine, trust a run whose load stayed near the
thread count. Written to `results/benchmarks/sampling.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

FALLBACK_PROMPTS = ["Write a haiku about autumn.", "Explain what a hash table is.",
                    "Give three tips for sleeping well.", "Summarize the plot of Romeo and Juliet.",
                    "What is the capital of Australia?", "Write a short email asking for a meeting.",
                    "Describe how a bicycle works.", "List five fruits that are red."]


def prompts(n: int) -> list[str]:
    """n instruction prompts spread over the base tasks (the IFEval-style set a round samples), or plain ones."""
    try:
        from lexalign.generation.instruction_set import prompt_set

        rows = prompt_set({}, 0).train
        step = max(len(rows) // n, 1)
        return [r["prompt"] for r in rows[::step][:n]]
    except Exception:  # noqa: BLE001 - the ifeval extra missing: plain instructions
        return [FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)] + f" (#{i})" for i in range(n)]


def real_tokens(rows: list[list[int]], stops: list[int]) -> list[int]:
    """Each row's generated tokens through its first end id (the padding generate() writes after it not counted)."""
    return [next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in rows]


def plain(model, tok, batches, args, seed: int) -> dict:
    import torch

    from lexalign.core import tokens
    from lexalign.generation.sampling import left_pad

    stops, pad = tokens.end_ids(model, tok), tokens.pad_id(tok)
    torch.manual_seed(seed)
    lengths, started, row_steps, prefilled = [], time.perf_counter(), 0, 0
    for batch in batches:
        input_ids, attention = left_pad(batch, pad)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True,
                                 num_return_sequences=args.samples, max_new_tokens=args.max_new_tokens,
                                 temperature=1.0, top_p=1.0, top_k=0, eos_token_id=stops, pad_token_id=pad)
        lengths += real_tokens(out[:, input_ids.shape[1]:].tolist(), stops)
        # The work done: every row computed until the batch's longest answer ended, every prompt K times.
        row_steps += out.shape[0] * (out.shape[1] - input_ids.shape[1])
        prefilled += input_ids.numel() * args.samples
    return {"seconds": time.perf_counter() - started, "lengths": lengths, "row_steps": row_steps,
            "prefilled": prefilled}


def lexalign(model, tok, batches, args, seed: int) -> dict:
    """As a round's generate job calls it: a shard's batches as one queue in one batch's rows (on the model it is
    given: `generate` casts it first where `Sampling.dtype` says so, and this benchmark gives the cast copy)."""
    from lexalign.generation.sampling import Sampling, sample_batches

    sampling = Sampling(samples_per_prompt=args.samples, temperature=1.0, top_p=1.0,
                        max_new_tokens=args.max_new_tokens, seed=seed)
    started = time.perf_counter()
    samples = sample_batches(model, tok, batches, sampling, [seed * 1000 + b for b in range(len(batches))])
    lengths = [len(ids) for groups in samples for group in groups for ids, _ in group]
    return {"seconds": time.perf_counter() - started, "lengths": lengths}


def lexalign_per_batch(model, tok, batches, args, seed: int) -> dict:
    """The ablation: LexAlign's sampler one batch at a time (no prompt joins another batch's free rows)."""
    from lexalign.generation.sampling import Sampling, sample

    sampling = Sampling(samples_per_prompt=args.samples, temperature=1.0, top_p=1.0,
                        max_new_tokens=args.max_new_tokens, seed=seed)
    lengths, started = [], time.perf_counter()
    for b, batch in enumerate(batches):
        lengths += [len(ids) for group in sample(model, tok, batch, sampling, seed=seed * 1000 + b)
                    for ids, _ in group]
    return {"seconds": time.perf_counter() - started, "lengths": lengths}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def profile(arms: dict, model_for: dict, tok, batches, args) -> None:
    """torch.profiler over one batch of each arm: the ops that take the time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, arm in arms.items():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            result = arm(model_for[name], tok, batches[:1], args, seed=0)
        print(f"\n== {name}: {sum(result['lengths'])} tokens in {result['seconds']:.1f} s (profiled)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/research/gguf/smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also the opt-in bfloat16 arm")
    parser.add_argument("--ablation", action="store_true", help="also LexAlign's sampler one batch at a time")
    parser.add_argument("--profile", action="store_true", help="profile one batch of each arm instead")
    parser.add_argument("--out", default="results/benchmarks/sampling.json")
    args = parser.parse_args()

    import torch

    from lexalign.core import tokens
    from lexalign.generation.sampling import Sampling, render_prompts
    from lexalign.models.loading import load_causal_lm, load_tokenizer

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model, "cpu").eval()
    texts, chat = render_prompts(tok, prompts(args.prompts))
    ids = sorted(tokens.prompt_ids(tok, texts, chat), key=len, reverse=True)  # as a round orders them
    batches = [ids[i:i + args.batch] for i in range(0, len(ids), args.batch)]
    arms = {"plain": plain, "lexalign": lexalign}
    model_for = {"plain": model, "lexalign": model}
    if args.ablation:
        arms["lexalign-per-batch"] = lexalign_per_batch
        model_for["lexalign-per-batch"] = model
    auto = Sampling(dtype="auto").resolved("cpu").dtype  # what the example's `dtype: auto` samples in here
    arms["lexalign-auto"] = lexalign
    model_for["lexalign-auto"] = copy.deepcopy(model).to(getattr(torch, auto)) if auto else model
    if args.bf16:
        arms["plain-bf16"] = plain
        model_for["plain-bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    print(f"{args.model}: {len(ids)} prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens, batches of "
          f"{args.batch}, K={args.samples}, max_new_tokens={args.max_new_tokens}, {args.threads} threads; "
          f"dtype auto here: {auto or 'as loaded (float32)'}; load {load()}", flush=True)
    if args.profile:
        profile(arms, model_for, tok, batches, args)
        return
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(args.repeats):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))
        for name in order:
            result = arms[name](model_for[name], tok, batches, args, seed=r)
            result["tokens"] = sum(result["lengths"])
            result["tokens_per_s"] = result["tokens"] / result["seconds"]
            result["mean_length"] = statistics.mean(result["lengths"])
            result["truncated"] = sum(n == args.max_new_tokens for n in result["lengths"])
            runs[name].append(result)
            work = (f"; {result['row_steps']} row-steps computed ({1 - result['tokens'] / result['row_steps']:.0%} "
                    f"for finished rows), {result['prefilled']} prompt tokens prefilled"
                    if "row_steps" in result else "")
            print(f"repeat {r} {name:14s} {result['tokens']:6d} tokens {result['seconds']:7.1f} s "
                  f"{result['tokens_per_s']:7.1f} tokens/s, mean length {result['mean_length']:.1f}, "
                  f"{result['truncated']} cut at max_new_tokens{work}; load {load()}", flush=True)
    print()
    summary = {}
    for name in arms:
        speeds = [x["tokens_per_s"] for x in runs[name]]
        ratios = [x["tokens_per_s"] / p["tokens_per_s"] for x, p in zip(runs[name], runs["plain"], strict=True)]
        summary[name] = {"tokens_per_s": speeds, "median_tokens_per_s": statistics.median(speeds),
                         "ratio": ratios, "median_ratio": statistics.median(ratios),
                         "mean_length": statistics.mean(x["mean_length"] for x in runs[name])}
        print(f"{name:14s} median {summary[name]['median_tokens_per_s']:6.1f} tokens/s "
              f"({', '.join(f'{s:.1f}' for s in speeds)}); vs plain {summary[name]['median_ratio']:.2f}x "
              f"({', '.join(f'{x:.2f}' for x in ratios)}); mean completion {summary[name]['mean_length']:.1f} tokens")
    print(f"load at the end {load()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "summary": summary,
                               "runs": {k: [{**x, "lengths": None} for x in v] for k, v in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()
