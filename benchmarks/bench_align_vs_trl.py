"""Benchmark (not a test): `lexalign align` against a plain TRL DPOTrainer script, side by side.

    .venv/bin/python benchmarks/bench_align_vs_trl.py                 # LoRA (the default align config)
    .venv/bin/python benchmarks/bench_align_vs_trl.py --method full   # full fine-tuning
    .venv/bin/python benchmarks/bench_align_vs_trl.py --steps 10 --memory-steps 4   # a quick run
    python benchmarks/bench_align_vs_trl.py --device cuda --hidden 1024 --layers 12 --batch 8 --seq-len 512

On a GPU (`--device cuda`) both sides use LexAlign's GPU settings (bf16,
gradient checkpointing, SDPA or FlashAttention, Liger where installed; bf16
frozen weights for LoRA), steps are timed on the wall clock after
`torch.cuda.synchronize()`, and memory is the peak GPU memory allocated.

Same SFT model (the demo Llama at 3.25M parameters), data (every sequence 256
tokens), hyperparameters and seed in four configurations:

* `trl`: a plain script: `AutoModelForCausalLM.from_pretrained`, `DPOTrainer(...)`, `train()`;
* `lexalign`: LexAlign's align step (`AlignJob`, as `lexalign align` runs it), the reference online;
* `trl-precompute`: the plain script with `precompute_ref_log_probs=True` (TRL's reference pass before training);
* `lexalign-reference`: the align step reading the pipeline's reference file (`lexalign.reference`).

Step rate: the four train in one process, in turns, one optimizer step each
(`common.Turns`: each run holds the turn from one step's start to the next, so
its data loading, logging and callbacks count with its step). Each step is
timed with its thread's CPU clock (`--clock cpu`, the default; other jobs on a
shared machine disturb it far less than wall time; with `--threads 1`, the
default, it is compute time). A ratio is the median of step-by-step ratios
(steps that ran one right after the other), after the first `--warmup` steps
and without the last (when a run may already be saving); the interquartile
range shows the noise.

Peak memory: each configuration again alone in its own process (`--memory-steps`
steps, `lexalign` including its save), its peak RSS at the end of training, and
what training added to the RSS before the model loaded.

The issue asks lexalign's steady-state step rate >= 0.97 x TRL's and peak memory within 5%.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIGS = ["trl", "lexalign", "trl-precompute", "lexalign-reference"]
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def training_run(name: str, spec: dict, callback, save: bool = True):
    """Set up configuration `name` with `callback` installed; return a zero-argument function that trains it.

    Models load here, not in the returned function: transformers' loading is not thread-safe. With `save`,
    lexalign's run ends as `lexalign align` does, saving the model (merged, for LoRA).
    """
    import pandas as pd
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    frame = pd.read_parquet(spec["data"])
    lora = spec["method"] == "lora"
    if name.startswith("lexalign"):
        from lexalign.config.loader import section_defaults
        from lexalign.config.sections import AlignConfig
        from lexalign.train.align import AlignJob

        params = section_defaults("alignment", {
            "use_lora": lora, "lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"], "lora_dropout": 0.0,
            "target_modules": LORA["target_modules"], "learning_rate": spec["lr"], "batch_size": spec["batch"],
            "gradient_accumulation_steps": 1, "warmup_steps": 0, "weight_decay": 0.0, "max_steps": spec["steps"],
            "max_length": spec["seq_len"], "logging_steps": spec["logging_steps"], "save_steps": 100000,
            "beta": 0.1})
        job = AlignJob(model_path=Path(spec["model"]), train=frame, eval=frame.iloc[:0],
                       cfg=AlignConfig.from_dict(params), output_dir=Path(spec["tmp"]) / f"out-{name}",
                       checkpoint_dir=Path(spec["tmp"]) / f"ckpt-{name}", device=spec["device"], seed=0,
                       reference_path=Path(spec["reference"]) if name == "lexalign-reference" else None,
                       extra_callbacks=[callback])
        if save:
            return job.run
        trainer, _, interrupt = job.setup()
        return functools.partial(common.train_only, job, trainer, interrupt)

    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load, settings = common.plain_trl_settings(spec["device"], lora)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **load)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    args = DPOConfig(output_dir=str(Path(spec["tmp"]) / f"ckpt-{name}"), learning_rate=spec["lr"],
                         per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
                     max_length=spec["seq_len"], logging_steps=spec["logging_steps"], save_strategy="no",
                     beta=0.1, seed=0, data_seed=0, report_to=[], disable_tqdm=True,
                     dataloader_num_workers=0, precompute_ref_log_probs=name == "trl-precompute",
                     # LexAlign's settings for the device (on the CPU gradient checkpointing is off,
                     # though on in TRL's default: it only trades compute for memory)
                     **settings)
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_pandas(frame, preserve_index=False),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA) if lora else None,
                         callbacks=[callback])
    return trainer.train


def worker(name: str, spec: dict, out: Path) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset  # noqa: F401  (imported before the baseline, as the align step has them)
    from trl import DPOTrainer  # noqa: F401

    if name == "turns":  # every configuration, step by step in turns, in this process
        turns = common.Turns(CONFIGS)
        turns.run({config: training_run(config, spec, turns.callback(config), save=False) for config in CONFIGS})
        out.write_text(json.dumps(turns.steps))
        return
    clock = common.step_clock()  # one configuration alone, for its peak memory
    baseline = common.current_rss_mb()
    training_run(name, {**spec, "steps": spec["memory_steps"]}, clock)()
    out.write_text(json.dumps({**clock.result(), "baseline_mb": baseline}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=30, help="training steps of each configuration")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out")
    parser.add_argument("--memory-steps", type=int, default=8, help="steps of each memory run")
    parser.add_argument("--memory-rounds", type=int, default=1)
    common.add_training_arguments(parser)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = common.parse_training_arguments(parser)
    if args.worker:
        name, spec, out = args.worker
        worker(name, json.loads(Path(spec).read_text()), Path(out))
        return

    from lexalign.reference.scoring import compute_reference

    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="bench-align-") as tmp:
        tmp = Path(tmp)
        params = common.write_model(tmp / "sft", args.hidden, args.layers, args.seq_len)
        frame = common.make_pairs(tmp / "sft", max(args.steps, args.memory_steps) * args.batch, 64, args.seq_len)
        frame.to_parquet(tmp / "pairs.parquet")
        compute_reference(tmp / "sft", frame, frame.iloc[:0], tmp / "reference.parquet", layout="pairs",
                          max_length=args.seq_len, device=args.device)
        spec = {"tmp": str(tmp), "model": str(tmp / "sft"), "data": str(tmp / "pairs.parquet"),
                "reference": str(tmp / "reference.parquet"), "method": args.method, "steps": args.steps,
                "memory_steps": args.memory_steps, "batch": args.batch, "seq_len": args.seq_len,
                "lr": 1e-4 if args.method == "full" else 1e-3, "logging_steps": 5, "threads": args.threads,
                "device": args.device}
        print("Step rates: the four configurations in turns, one step each, in one process", flush=True)
        steps = common.run_worker(script, "turns", spec, args.threads)
        print("Peak memory: each configuration in its own process", flush=True)
        memory = common.by_turns(script, CONFIGS, spec, args.memory_rounds, args.threads)

    clock = args.clock
    gpu = args.device == "cuda"
    # On a GPU the peak GPU memory allocated (nothing is allocated there before the model loads).
    peak = {name: statistics.median(r["peak_gpu_mb" if gpu else "peak_train_mb"] for r in runs)
            for name, runs in memory.items()}
    added = {name: statistics.median(r["peak_gpu_mb"] if gpu else r["peak_train_mb"] - r["baseline_mb"]
                                     for r in runs) for name, runs in memory.items()}
    memory_label = "peak GPU MB" if gpu else "peak RSS MB"
    print(f"\nlexalign align vs plain TRL DPOTrainer ({common.machine()}, {args.threads} thread(s) each)")
    print(f"Llama {params / 1e6:.2f}M parameters (hidden {args.hidden}, {args.layers} layers), {args.method}, "
          f"{args.batch} pairs/step, {args.seq_len}-token sequences; {args.steps} steps each in turns, the first "
          f"{args.warmup} and the last left out; {clock} time of each step (its thread's clock)")
    print(f"{'configuration':<20} {'steps/s':>8} {memory_label:>12} {'added by training MB':>21}")
    for name in CONFIGS:
        rate = 1 / statistics.median(s[clock] for s in steps[name][args.warmup:-1])
        print(f"{name:<20} {rate:>8.3f} {peak[name]:>12.0f} {added[name]:>21.0f}")
    print("ratios: the median of step-by-step ratios (steps that ran one after the other), interquartile range")
    for ours, theirs in (("lexalign", "trl"), ("lexalign-reference", "trl-precompute"),
                         ("lexalign-reference", "trl")):
        ratio, low, high = common.paired_ratio(steps[ours], steps[theirs], args.warmup, clock)
        memory_change = peak[ours] / peak[theirs] - 1
        print(f"{ours} / {theirs}: step rate {ratio:.3f} (IQR {low:.3f}..{high:.3f}; "
              f"{'>=' if ratio >= 0.97 else '<'} 0.97), {memory_label[:-3]} {memory_change:+.1%} "
              f"({'within' if abs(memory_change) <= 0.05 else 'NOT within'} 5%), "
              f"memory added by training {added[ours] - added[theirs]:+.0f} MB")


if __name__ == "__main__":
    main()
