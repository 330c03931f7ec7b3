"""Benchmark (not a test): an online round's generation (`lexalign.generation.sampling`) against a plain
`model.generate` loop over the same prompts, side by side in one run.

    .venv/bin/python benchmarks/bench_generate.py
    .venv/bin/python benchmarks/bench_generate.py --prompts 16 --rounds 1          # quick
    python benchmarks/bench_generate.py --device cuda --hidden 1024 --layers 12 --prompts 512 --batch 64

The model is the demo's Llama at benchmark size (`common.write_model`) with its
chat template; the prompts are demo words of 8 to `--max-prompt-tokens` tokens
(uniformly random lengths, so padding matters). Both sides sample K =
`--samples` completions per prompt at temperature 1 (top_p 1, no top_k), stop
at the model's end ids, and count the tokens of each completion through its end
id (the same count on both sides):

* `plain`: what a script does: for each prompt, `apply_chat_template(...,
  return_tensors="pt")` and `model.generate(..., num_return_sequences=K)`;
* `lexalign`: `lexalign.generation.sampling` (length-sorted, left-padded batches of
  `--batch` prompts), the whole call timed: tokenizing, hashing the policy,
  writing the shards and the joined parquet included.

Each round runs both, the order alternating, each loading the model from disk
(timed too); the figure is the median over rounds of the ratio of tokens per
wall-clock second, lexalign / plain. Written to `results/benchmarks/generate.json`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def prompts(model_dir: Path, n: int, longest: int, seed: int = 0) -> list[str]:
    from lexalign.models.loading import load_tokenizer

    text = common.text_maker(load_tokenizer(model_dir), seed)
    rng = random.Random(seed)
    return [text(rng.randint(8, longest)) for _ in range(n)]


def plain(model_dir: Path, texts: list[str], args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(args.device).eval()
    stops = model.generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    torch.manual_seed(0)
    generated = 0
    for text in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"].to(args.device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=args.max_new_tokens, num_return_sequences=args.samples,
                                 eos_token_id=stops, pad_token_id=pad)
        for row in out[:, ids.shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            generated += len(row) if end is None else end + 1
    common.sync()
    return {"tokens": generated, "seconds": time.perf_counter() - started}


def ours(model_dir: Path, texts: list[str], args, out: Path) -> dict:
    from lexalign.generation.sampling import Sampling, generate

    started = time.perf_counter()
    report = generate(model_dir, texts, out, Sampling(samples_per_prompt=args.samples, temperature=1.0, top_p=1.0,
                                                      max_new_tokens=args.max_new_tokens, seed=0),
                      batch_size=args.batch, device=args.device, shard_prompts=max(args.batch, 256))
    common.sync()
    tokens = round(report["mean_completion_tokens"] * report["completions"])
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "generation_seconds": report["seconds"],
            "truncated": report["truncated"], "completions": report["completions"]}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16, help="prompts per batch (lexalign), each sampled K times")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=common.REPO / "results" / "benchmarks" / "generate.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        size = common.write_model(model_dir, args.hidden, args.layers, args.max_prompt_tokens + args.max_new_tokens
                                  + 64)
        texts = prompts(model_dir, args.prompts, args.max_prompt_tokens)
        runs: dict[str, list[dict]] = {"plain": [], "lexalign": []}
        for r in range(args.rounds):
            for name in (["plain", "lexalign"] if r % 2 == 0 else ["lexalign", "plain"]):
                result = plain(model_dir, texts, args) if name == "plain" else \
                    ours(model_dir, texts, args, Path(tmp) / f"gen-{r}")
                result["tokens_per_second"] = result["tokens"] / result["seconds"]
                runs[name].append(result)
                print(f"  round {r + 1}/{args.rounds} {name:8s} {result['tokens']:6d} tokens "
                      f"{result['seconds']:7.2f} s  {result['tokens_per_second']:8.1f} tokens/s", flush=True)
    ratios = [o["tokens_per_second"] / p["tokens_per_second"] for o, p in zip(runs["lexalign"], runs["plain"],
                                                                               strict=True)]
    summary = {"machine": common.machine(), "parameters": size, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                                             for k, v in vars(args).items()},
               "runs": runs, "ratio_median": statistics.median(ratios), "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"lexalign / plain tokens per second: x{summary['ratio_median']:.2f} (median of {len(ratios)} rounds: "
          + ", ".join(f"{r:.2f}" for r in ratios) + f") -> {args.out}")


if __name__ == "__main__":
    main()
