"""Padding-free vs padded reference log-probs on a long-tailed length mix, side by side in one run.

The reference step (`lexalign.reference.scoring.group_logps`) scores every response once; here it scores the same
pairs packed by a token budget (`lexalign.models.packing`) and in the padded batches of the trainers' collator
(batch 4 pairs = 8 sequences, TRL's DataCollatorForPreference shape), in turns, each in a process of its
own so peak memory is its own. Lengths follow the realistic mix of issue #17: log-normal prompts (median
≈ 50 tokens) and responses (median ≈ 100), tails to 650. Two vocabularies: 32k and 150k.

    python benchmarks/bench_packing.py [--pairs 48] [--rounds 3]

Prints tokens/s (real tokens, padding excluded), the padding share of the padded batches, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def lengths(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    return max(2, min(cap, int(math.exp(rng.gauss(math.log(median), sigma)))))


def make_table(vocab: int, pairs: int, seed: int = 0):
    import pyarrow as pa

    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(pairs):
        prompts.append([rng.randrange(5, vocab) for _ in range(lengths(rng, 50, 0.6, 400))])
        completions.append([[rng.randrange(5, vocab) for _ in range(lengths(rng, 100, 0.7, 650))] for _ in range(2)])
    ids = pa.list_(pa.int32())
    return pa.table({"prompt_ids": pa.array(prompts, type=ids), "completion_ids": pa.array(completions,
                                                                                           type=pa.list_(ids))})


def model(vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         attn_implementation="sdpa")
    net = LlamaForCausalLM(config).eval()
    add_fused_lm_head(net)
    return net


def padded_group_logps(model, pad_token_id: int, tokens, max_length, truncation_mode, batch_sequences, device,
                        autocast) -> list[list[float]]:
    """The reference step's log-probs in the padded batches of the trainers' collator (response-major, right
    padded, longest groups first): what the reference step cost before it packed, for the comparison."""
    import numpy as np
    import pyarrow.compute as pc
    import torch

    from lexalign.train.ranked_trainer import DataCollatorForRankedPreference

    n = tokens.num_rows
    completions = tokens.column("completion_ids")
    k = len(completions[0])
    prompt_lengths = pc.list_value_length(tokens.column("prompt_ids")).to_numpy()
    completion_lengths = pc.list_value_length(pc.list_flatten(completions)).to_numpy().reshape(n, k)
    order = np.argsort(-(prompt_lengths + completion_lengths.max(axis=1)), kind="stable")
    collate = DataCollatorForRankedPreference(pad_token_id=pad_token_id, max_length=max_length,
                                              truncation_mode=truncation_mode)
    per_batch = max(1, batch_sequences // k)
    out: list = [None] * n
    with torch.inference_mode(), autocast:
        for start in range(0, n, per_batch):
            index = order[start:start + per_batch]
            rows = tokens.take(index).to_pylist()
            batch = collate([{**row, "scores": [0.0] * k} for row in rows])
            completion_mask = batch["completion_mask"]
            labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
            outputs = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                            labels=labels.to(device), use_cache=False, fused_lm_head=True)
            seq_len = completion_mask.size(1) - 1
            logps = outputs.log_probs[:, -seq_len:].sum(dim=1).float()
            for position, values in zip(index.tolist(), logps.view(k, len(index)).T.cpu().tolist(), strict=True):
                out[position] = values
    return out


def one(mode: str, vocab: int, pairs: int) -> dict:
    """Score every pair once in `mode` (packed | padded); this process's figures."""
    import torch

    from lexalign.reference.scoring import group_logps

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    table = make_table(vocab, pairs)
    net = model(vocab)
    started = time.perf_counter()
    if mode == "packed":
        group_logps(net, table, max_length=None, token_budget=int(os.environ.get("BENCH_BUDGET", "1024")))
    else:
        with torch.inference_mode():
            padded_group_logps(net, 0, table, None, "keep_start", 8, "cpu",
                                          torch.autocast("cpu", enabled=False))
    seconds = time.perf_counter() - started
    real = sum(len(p) + len(c) for p, group in zip(table.column("prompt_ids").to_pylist(),
                                                   table.column("completion_ids").to_pylist(), strict=True)
               for c in group)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "tokens": real, "peak_rss_mb": peak}


def padding_share(vocab: int, pairs: int, batch_pairs: int = 4) -> float:
    table = make_table(vocab, pairs)
    prompts = table.column("prompt_ids").to_pylist()
    groups = table.column("completion_ids").to_pylist()
    real = padded = 0
    for start in range(0, pairs, batch_pairs):
        seqs = [len(p) + len(c) for p, g in zip(prompts[start:start + batch_pairs], groups[start:start + batch_pairs],
                                                strict=True) for c in g]
        real += sum(seqs)
        padded += max(seqs) * len(seqs)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.pairs)))
        return
    for vocab in (32_000, 150_000):
        runs = {"packed": [], "padded": []}
        for round_ in range(args.rounds):
            for mode in (("packed", "padded") if round_ % 2 == 0 else ("padded", "packed")):  # turns
                done = subprocess.run([sys.executable, __file__, "--pairs", str(args.pairs), "--one", mode,
                                       str(vocab)], capture_output=True, text=True, check=True)
                runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
        rate = {m: sorted(r["tokens"] / r["seconds"] for r in runs[m])[len(runs[m]) // 2] for m in runs}
        peak = {m: max(r["peak_rss_mb"] for r in runs[m]) for m in runs}
        share = padding_share(vocab, args.pairs)
        print(f"vocab {vocab}: {args.pairs} pairs, padding at batch 4 pairs: {100 * share:.0f}% of the padded tokens")
        print(f"  packed {rate['packed']:.0f} tok/s, padded {rate['padded']:.0f} tok/s: "
              f"{rate['packed'] / rate['padded']:.2f}x (median of {args.rounds})")
        print(f"  peak RSS packed {peak['packed']:.0f} MB, padded {peak['padded']:.0f} MB: "
              f"{peak['packed'] / peak['padded']:.2f}x")


if __name__ == "__main__":
    main()
