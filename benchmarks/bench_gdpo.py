"""Benchmark (not a test): GDPO vs DPO training throughput per response, side by side.

    .venv/bin/python benchmarks/bench_gdpo.py [--device cpu|cuda] [--steps 20] [--batch 4]
    .venv/bin/python benchmarks/bench_gdpo.py --threads 1 --clock cpu   # on a busy shared CPU

One run trains, on the same model and sequence length (every sequence exactly
`--seq-len` tokens, so padding plays no part):

* DPO (TRL's DPOTrainer) with B pairs per step (2B sequences) and with 2B pairs (4B sequences);
* GDPO at K = 2 with B prompts: the same 2B sequences, the same batch as DPO's;
* GDPO at K = 4 with B/2 prompts: the same 2B sequences per forward pass;
* GDPO at K = 4 with B prompts: 4B sequences per step.

Each GDPO configuration is compared with the DPO one that trains as many
sequences per step, so batch-size effects cancel.

A step is what the trainers do per optimizer step: the policy forward pass,
the reference pass, the loss and its metrics, backward and AdamW (driven by
hand, so the Trainer loop's logging plays no part). After a warm-up step, the
configurations take turns, one step each, `--steps` times, so a busy machine
slows all of them alike; the median step time is reported. Throughput is
responses (prompt + completion sequences) trained per second; the ratio to DPO
is paired round by round (median). The issue asks GDPO's throughput per
response to be within 10% of DPO's at K = 2 (ratio >= 0.90).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository on the path)


def make_texts(tokenizer, prompt_tokens: int, completion_tokens: int, groups: int, k: int, seed: int):
    """Prompts and K responses of (at least) the given token lengths, from the demo vocabulary."""
    text = common.text_maker(tokenizer, seed)
    return [{"prompt": text(prompt_tokens), "responses": [text(completion_tokens) for _ in range(k)],
             "scores": [float(k - i) for i in range(k)]} for _ in range(groups)]


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Config:
    """One trainer (DPO or GDPO) set up for timing its training steps by hand."""

    def __init__(self, label: str, kind: str, k: int, prompts: int, model_dir: Path, rows: list[dict], args: dict):
        import itertools

        import pandas as pd
        import torch
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        from lexalign.models.loading import load_causal_lm, load_tokenizer
        from lexalign.train.ranked_trainer import RankedConfig, RankedTrainer, ranked_dataset

        self.label, self.kind, self.k, self.prompts = label, kind, k, prompts
        device = args["device"]
        tokenizer = load_tokenizer(model_dir)
        model = load_causal_lm(model_dir, device)
        shared = {
            "output_dir": str(model_dir.parent / "checkpoints"),
            "per_device_train_batch_size": prompts,
            "report_to": [],
            "use_cpu": device == "cpu",
            "bf16": device == "cuda",
            "disable_tqdm": True,
            "max_length": args["seq_len"],
            "seed": 0,
            "dataloader_num_workers": 0,
        }
        frame = pd.DataFrame(rows)
        if kind == "dpo":
            pairs = frame.assign(chosen=frame.responses.str[0], rejected=frame.responses.str[-1])
            dataset = Dataset.from_pandas(pairs[["prompt", "chosen", "rejected"]], preserve_index=False)
            self.trainer = DPOTrainer(model=model, args=DPOConfig(**shared), train_dataset=dataset,
                                      processing_class=tokenizer)
        else:
            self.trainer = RankedTrainer(model=model, args=RankedConfig(**shared, group_size=k),
                                       train_dataset=ranked_dataset(frame, k), processing_class=tokenizer)
        self.model = self.trainer.model.to(self.trainer.args.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.batches = itertools.cycle(list(self.trainer.get_train_dataloader()))
        self.times: list[float] = []
        self.cpu_clock = args["clock"] == "cpu"

    def step(self) -> float:
        """One optimizer step: policy pass, reference pass, loss and metrics, backward, AdamW."""
        batch = self.trainer._prepare_inputs(next(self.batches))
        self.model.train()
        clock = time.process_time if self.cpu_clock else time.perf_counter
        sync()
        start = clock()
        with self.trainer.compute_loss_context_manager():
            loss = self.trainer.compute_loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        elapsed = clock() - start
        self.trainer._metrics["train"].clear()
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=4, help="DPO pairs per step (B); even")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall time, or the process's CPU time (steadier on a CPU shared with other jobs)")
    args = vars(parser.parse_args())

    import torch

    if args["threads"]:
        torch.set_num_threads(args["threads"])

    from lexalign.demo.model import build_model, build_tokenizer

    tokenizer = build_tokenizer(0)
    model = build_model(tokenizer, 0, hidden_size=args["hidden"], layers=args["layers"])
    model.config.max_position_embeddings = max(args["seq_len"], model.config.max_position_embeddings)
    params = sum(p.numel() for p in model.parameters())
    batch = args["batch"]
    # Completions longer than seq_len - prompt_len are truncated, so every sequence is exactly seq_len tokens.
    rows = make_texts(tokenizer, args["prompt_len"], args["seq_len"], groups=batch * 4, k=4, seed=0)
    configs = [  # (label, kind, K, prompts per step)
        (f"DPO (TRL), {batch} pairs", "dpo", 2, batch),
        (f"DPO (TRL), {2 * batch} pairs", "dpo", 2, 2 * batch),
        ("GDPO K=2", "gdpo", 2, batch),
        ("GDPO K=4, B/2 prompts", "gdpo", 4, batch // 2),
        ("GDPO K=4, B prompts", "gdpo", 4, batch),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        runs = [Config(*config, model_dir, rows, args) for config in configs]
        for run in runs:  # warm-up
            run.step()
        # Round robin, one step each: a busy machine slows every configuration alike.
        for _ in range(args["steps"]):
            for run in runs:
                run.times.append(run.step())

    device = torch.cuda.get_device_name(0) if args["device"] == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\nGDPO vs DPO training throughput per response ({device})")
    print(f"Llama {params / 1e6:.2f}M parameters (hidden {args['hidden']}, {args['layers']} layers), "
          f"full fine-tuning, {args['seq_len']}-token sequences, {args['steps']} timed steps each (round robin), "
          f"median {args['clock']} time per step")
    print(f"{'configuration':<24} {'prompts':>7} {'K':>2} {'sequences/step':>14} {'step s':>8} "
          f"{'responses/s':>11} {'vs DPO*':>7}")

    def paired_ratio(run: Config) -> float:
        """Throughput per response relative to DPO with as many sequences per step, paired round by round."""
        dpo = next(r for r in runs if r.kind == "dpo" and r.prompts * 2 == run.prompts * run.k)
        return statistics.median((run.prompts * run.k / t) / (dpo.prompts * 2 / d)
                                 for t, d in zip(run.times, dpo.times, strict=True))

    for run in runs:
        per_step = run.prompts * run.k
        step = statistics.median(run.times)
        print(f"{run.label:<24} {run.prompts:>7} {run.k:>2} {per_step:>14} {step:>8.3f} {per_step / step:>11.1f} "
              f"{paired_ratio(run):>7.3f}")
    print("* throughput per response over DPO's with the same number of sequences per step: the median of "
          "round-by-round ratios")
    gdpo_k2 = next(r for r in runs if r.label == "GDPO K=2")
    k2 = paired_ratio(gdpo_k2)
    print(f"\nGDPO/DPO throughput per response at K=2: {k2:.3f} "
          f"({'within' if k2 >= 0.90 else 'NOT within'} 10% of DPO)")
    for run in runs:
        if run.kind == "gdpo" and run.k == 4:
            print(f"GDPO/DPO throughput per response at K=4 ({run.prompts} prompts, {run.prompts * 4} sequences "
                  f"per step): {paired_ratio(run):.3f}")


if __name__ == "__main__":
    main()
