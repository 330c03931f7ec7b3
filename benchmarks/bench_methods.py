"""Benchmark (not a test): the step rate of each preference method against DPO's, side by side in one run.

    .venv/bin/python benchmarks/bench_methods.py                  # LoRA (the default align config)
    .venv/bin/python benchmarks/bench_methods.py --method full    # full fine-tuning
    .venv/bin/python benchmarks/bench_methods.py --steps 10       # a quick run
    python benchmarks/bench_methods.py --device cuda --hidden 1024 --layers 12 --batch 8 --seq-len 512

Every configuration is LexAlign's align step (`AlignJob`, as `lexalign align`
and the pipeline run it) on the same SFT model (the demo Llama at 3.25M
parameters), the same pairs (every sequence `--seq-len` tokens) and the same
hyperparameters:

* `dpo`: DPO reading the reference step's file (as the pipeline runs it), and `dpo-online`
  (the reference pass in every step);
* `kto`, `kto-online`: KTO on the same pairs split into a desirable and an undesirable
  row, 2B rows per step (the 2B responses of DPO's B pairs), with the reference
  file (the completions' and the KL completions' log-probs) or online; each step
  also runs the policy, without gradients, over the B·2 KL completions;
* `orpo`, `simpo`, `cpo`: reference-free, one forward pass of the policy per step.

They train in one process, in threads taking turns one optimizer step each
(`common.Turns`), each step timed with its thread's CPU clock (`--clock cpu`,
the default). A ratio to DPO is the median of step-by-step ratios after the
first `--warmup` steps (and without the last); the interquartile range shows
the noise. Every configuration trains as many responses per step as DPO, so
the ratio is also the ratio of responses trained per second.
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

CONFIGS = ["dpo", "dpo-online", "kto", "kto-online", "orpo", "simpo", "cpo"]
KEYS = {"dpo": {"beta": 0.1}, "kto": {"beta": 0.1}, "orpo": {"orpo_lambda": 0.1},
        "simpo": {"beta": 2.0, "gamma": 1.0}, "cpo": {"beta": 0.1, "cpo_alpha": 1.0}}


def training_run(name: str, spec: dict, callback):
    """Set up configuration `name` (models load here: transformers' loading is not thread-safe) and return a
    zero-argument function that trains it, as AlignJob.run does between setup and save."""
    import pandas as pd

    from lexalign.config.loader import section_defaults
    from lexalign.config.sections import AlignConfig
    from lexalign.train.align import AlignJob

    method = name.removesuffix("-online")
    frame = pd.read_parquet(spec["data"])
    batch = spec["batch"] * (2 if method == "kto" else 1)  # KTO: a row per response, as many as DPO's pairs hold
    params = section_defaults("alignment", {
        "method": method, **KEYS[method], "use_lora": spec["method"] == "lora", "lora_r": 16, "lora_alpha": 32,
        "lora_dropout": 0.0, "target_modules": "all-linear", "learning_rate": spec["lr"], "batch_size": batch,
        "gradient_accumulation_steps": 1, "warmup_steps": 0, "weight_decay": 0.0, "max_steps": spec["steps"],
        "max_length": spec["seq_len"], "logging_steps": 5, "save_steps": 100000})
    reference = spec["reference"].get(method) if not name.endswith("-online") else None
    job = AlignJob(model_path=Path(spec["model"]), train=frame, eval=frame.iloc[:0],
                   cfg=AlignConfig.from_dict(params), output_dir=Path(spec["tmp"]) / f"out-{name}",
                   checkpoint_dir=Path(spec["tmp"]) / f"ckpt-{name}", device=spec["device"], seed=0,
                   reference_path=Path(reference) if reference else None, extra_callbacks=[callback])
    trainer, _, interrupt = job.setup()
    return functools.partial(common.train_only, job, trainer, interrupt)


def worker(name: str, spec: dict, out: Path) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    turns = common.Turns(CONFIGS)
    turns.run({config: training_run(config, spec, turns.callback(config)) for config in CONFIGS})
    out.write_text(json.dumps(turns.steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=30, help="training steps of each configuration")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out")
    common.add_training_arguments(parser)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = common.parse_training_arguments(parser)
    if args.worker:
        name, spec, out = args.worker
        worker(name, json.loads(Path(spec).read_text()), Path(out))
        return

    from lexalign.reference.scoring import compute_reference

    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as tmp:
        tmp = Path(tmp)
        params = common.write_model(tmp / "sft", args.hidden, args.layers, args.seq_len)
        frame = common.make_pairs(tmp / "sft", args.steps * args.batch, 64, args.seq_len)
        frame.to_parquet(tmp / "pairs.parquet")
        references = {}
        for method, layout in (("dpo", "pairs"), ("kto", "unpaired")):
            references[method] = str(tmp / f"reference-{layout}.parquet")
            compute_reference(tmp / "sft", frame, frame.iloc[:0], references[method], layout=layout,
                              max_length=args.seq_len, device=args.device)
        spec = {"tmp": str(tmp), "model": str(tmp / "sft"), "data": str(tmp / "pairs.parquet"),
                "reference": references, "method": args.method, "steps": args.steps, "batch": args.batch,
                "seq_len": args.seq_len, "lr": 1e-4 if args.method == "full" else 1e-3, "threads": args.threads,
                "device": args.device}
        print(f"Step rates: {len(CONFIGS)} configurations in turns, one step each, in one process", flush=True)
        steps = common.run_worker(script, "turns", spec, args.threads)

    clock = args.clock
    print(f"\nEvery method against DPO ({common.machine()}, {args.threads} thread(s))")
    print(f"Llama {params / 1e6:.2f}M parameters (hidden {args.hidden}, {args.layers} layers), {args.method}, "
          f"{args.batch} pairs ({2 * args.batch} responses) per step, {args.seq_len}-token sequences; {args.steps} "
          f"steps each in turns, the first {args.warmup} and the last left out; {clock} time of each step")
    print(f"{'configuration':<12} {'steps/s':>8} {'responses/s':>12} {'vs dpo':>7} {'IQR':>13} "
          f"{'vs dpo-online':>13}")
    for name in CONFIGS:
        rate = 1 / statistics.median(s[clock] for s in steps[name][args.warmup:-1])
        ratio, low, high = common.paired_ratio(steps[name], steps["dpo"], args.warmup, clock)
        online, _, _ = common.paired_ratio(steps[name], steps["dpo-online"], args.warmup, clock)
        print(f"{name:<12} {rate:>8.3f} {rate * 2 * args.batch:>12.1f} {ratio:>7.3f} {low:>6.3f}..{high:<6.3f} "
              f"{online:>13.3f}")
    print("vs dpo: step rate over DPO's with the reference file (the pipeline's way), the median of step-by-step "
          "ratios; vs dpo-online: over DPO's with its reference pass in every step")


if __name__ == "__main__":
    main()
