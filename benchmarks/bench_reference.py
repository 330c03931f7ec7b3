"""Benchmark (not a test): a 3-epoch align run with the reference step against without it.

    .venv/bin/python benchmarks/bench_reference.py
    .venv/bin/python benchmarks/bench_reference.py --steps-per-epoch 4 --skip-memory --skip-tokenize  # quick
    python benchmarks/bench_reference.py --device cuda --hidden 1024 --layers 12 --batch 8 --seq-len 512

On a GPU (`--device cuda`) the runs use LexAlign's GPU settings, steps are
timed on the wall clock after `torch.cuda.synchronize()`, and the memory part
compares peak GPU memory allocated.

Three parts:

1. **Epoch time** (the demo Llama at 3.25M parameters, 256-token sequences,
   LoRA and full fine-tuning): `online-*` is LexAlign's align step with the
   reference computed in every step; `reference-*` reads the reference step's
   file. The four runs train in one process, in turns, one step each (each
   step timed with its thread's CPU clock, see `common.Turns`), so a busy
   machine slows them alike. The reference step (`compute_reference`) runs
   before, in its own process, as in the pipeline, and is timed apart. The
   figure is the time of epochs 2 and 3 with the reference file over the same
   without. A DPO step is a policy forward and backward plus a reference
   forward; without the reference forward the arithmetic floor of the ratio is
   about 0.75 for full fine-tuning (a backward costs about two forwards) and
   lower for LoRA (whose backward computes no weight gradients for the frozen
   weights). The issue asks <= 0.8.
2. **Peak memory, full fine-tuning** (a bigger model, `--memory-hidden`,
   `--memory-layers`, so the weights are not lost in the interpreter's own
   RSS): two steps, with and without the reference file, each in its own
   process; peak RSS and what training added to the RSS before the model loaded.
3. **Tokenization** of `--tokenize-rows` pairs, each in its own process, by
   turns, `--rounds` times: TRL's DPOTrainer preparation (`datasets.map`, one
   example at a time, as the online path tokenizes), `lexalign.reference`
   (batched; the Rust tokenizer on every core for large batches) and the
   content-keyed cache answering a second run. Both clocks are shown: the
   parallelism shows in wall time, which a shared machine makes noisy.

`--clock cpu` (the default) times steps with the thread's CPU time, steadier
than wall time on a shared machine; `--threads 1` (the default) makes CPU time
compute time.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RUNS = ["online-lora", "reference-lora", "online-full", "reference-full"]


def align_job(spec: dict, name: str, callback):
    import pandas as pd

    from lexalign.config.loader import section_defaults
    from lexalign.config.sections import AlignConfig
    from lexalign.train.align import AlignJob

    kind, method = name.split("-")
    use_lora = method == "lora"
    frame = pd.read_parquet(spec["data"])
    params = section_defaults("alignment", {
        "use_lora": use_lora, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
        "learning_rate": 1e-3 if use_lora else 1e-4, "batch_size": spec["batch"], "gradient_accumulation_steps": 1,
        "warmup_steps": 0, "weight_decay": 0.0, "num_epochs": spec["epochs"], "max_steps": spec.get("max_steps"),
        "max_length": spec["seq_len"], "logging_steps": 5, "save_steps": 100000, "beta": 0.1})
    return AlignJob(model_path=Path(spec["model"]), train=frame, eval=frame.iloc[:0],
                    cfg=AlignConfig.from_dict(params), output_dir=Path(spec["tmp"]) / f"out-{name}",
                    checkpoint_dir=Path(spec["tmp"]) / f"ckpt-{name}", device=spec["device"], seed=0,
                    reference_path=Path(spec["reference"]) if kind == "reference" else None,
                    extra_callbacks=[callback])


def worker(name: str, spec: dict, out: Path) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    import pandas as pd
    from trl import DPOTrainer  # noqa: F401  (imported before the baseline, as the align step has it)

    if name == "refstep":  # the reference step, in its own process as in the pipeline
        from lexalign.reference.scoring import compute_reference

        frame = pd.read_parquet(spec["data"])
        started = (time.process_time(), time.perf_counter())
        compute_reference(spec["model"], frame, frame.iloc[:0], spec["reference"], layout="pairs",
                          max_length=spec["seq_len"], cache_dir=Path(spec["tmp"]) / "cache", device=spec["device"])
        out.write_text(json.dumps({"cpu": time.process_time() - started[0], "wall": time.perf_counter() - started[1],
                                   "peak_mb": common.peak_rss_mb(), "peak_gpu_mb": common.peak_gpu_mb()}))
    elif name == "turns":  # the four runs, in turns, in this process
        turns = common.Turns(RUNS)
        targets = {}
        for run in RUNS:  # set up here: transformers' model loading is not thread-safe
            job = align_job(spec, run, turns.callback(run))
            trainer, _, interrupt = job.setup()
            targets[run] = functools.partial(common.train_only, job, trainer, interrupt)  # job.run(), no saving
        turns.run(targets)
        out.write_text(json.dumps(turns.steps))
    else:  # one run alone, for its peak memory
        baseline = common.current_rss_mb()
        clock = common.step_clock()
        align_job(spec, name, clock).run()
        out.write_text(json.dumps({**clock.result(), "baseline_mb": baseline}))


def tokenize_worker(name: str, spec: dict, out: Path) -> None:
    """One tokenization of the pairs: TRL's preparation, lexalign's batched one, or the cache answering."""
    import pandas as pd
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lexalign.methods import Layout
    from lexalign.models.loading import load_tokenizer
    from lexalign.reference import cache as tokens_cache
    from lexalign.reference.layout import split_groups

    frame = pd.read_parquet(spec["tokenize_data"])
    tokenizer = load_tokenizer(spec["model"])
    groups = split_groups(frame, Layout.PAIRS.value)
    cache = Path(spec["tmp"]) / "tokenize-cache"
    if name == "tok-cached":  # a first run fills the cache (not timed)
        tokens_cache.cached_tokens(tokenizer, "bench", groups, cache)
    started = (time.process_time(), time.perf_counter())
    if name == "tok-trl":
        from types import SimpleNamespace

        args = DPOConfig(output_dir=spec["tmp"], max_length=None, use_cpu=True, bf16=False, report_to=[])
        stub = SimpleNamespace(_tokenizer=tokenizer)
        DPOTrainer._prepare_dataset(stub, Dataset.from_pandas(frame, preserve_index=False), tokenizer, args, "train")
    elif name == "tok-lexalign":
        tokens_cache.token_table(tokenizer, groups)
    else:
        assert tokens_cache.cached_tokens(tokenizer, "bench", groups, cache)[1], "the cache did not answer"
    out.write_text(json.dumps({"cpu": time.process_time() - started[0], "wall": time.perf_counter() - started[1]}))


def median(values) -> float:
    return statistics.median(list(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    common.add_training_arguments(parser)
    parser.add_argument("--memory-hidden", type=int, default=1024)
    parser.add_argument("--memory-layers", type=int, default=8)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--tokenize-rows", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the tokenization part")
    parser.add_argument("--skip-tokenize", action="store_true")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = common.parse_training_arguments(parser)
    if args.worker:
        name, spec, out = args.worker
        spec = json.loads(Path(spec).read_text())
        (tokenize_worker if name.startswith("tok-") else worker)(name, spec, Path(out))
        return

    script = Path(__file__).resolve()
    clock = args.clock
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        tmp = Path(tmp)
        params = common.write_model(tmp / "sft", args.hidden, args.layers, args.seq_len)
        frame = common.make_pairs(tmp / "sft", args.steps_per_epoch * args.batch, 64, args.seq_len)
        frame.to_parquet(tmp / "pairs.parquet")
        spec = {"tmp": str(tmp), "model": str(tmp / "sft"), "data": str(tmp / "pairs.parquet"), "batch": args.batch,
                "epochs": args.epochs, "seq_len": args.seq_len, "threads": args.threads,
                "reference": str(tmp / "reference.parquet"), "device": args.device}
        print("The reference step, in its own process", flush=True)
        refstep = common.run_worker(script, "refstep", spec, args.threads)
        print("Epochs: the four runs in turns, one step each, in one process", flush=True)
        steps = common.run_worker(script, "turns", spec, args.threads)

        memory = None
        if not args.skip_memory:
            big = tmp / "big"
            memory_params = common.write_model(big / "sft", args.memory_hidden, args.memory_layers, args.seq_len)
            common.make_pairs(big / "sft", 4, 64, args.seq_len).to_parquet(big / "pairs.parquet")
            memory_spec = {**spec, "tmp": str(big), "model": str(big / "sft"), "data": str(big / "pairs.parquet"),
                           "batch": 2, "epochs": 1, "max_steps": 2, "reference": str(big / "reference.parquet")}
            print("Peak memory: the reference step, then each run in its own process", flush=True)
            memory_ref = common.run_worker(script, "refstep", memory_spec, args.threads)
            memory = common.by_turns(script, ["online-full", "reference-full"], memory_spec, 1, args.threads)

        tokenize = None
        if not args.skip_tokenize:
            import pandas as pd

            rows = common.make_pairs(tmp / "sft", min(args.tokenize_rows, 200), 64, args.seq_len)
            repeats = -(-args.tokenize_rows // len(rows))
            many = pd.concat([rows] * repeats, ignore_index=True).iloc[:args.tokenize_rows]
            many["prompt"] = [f"{i}: {p}" for i, p in enumerate(many["prompt"])]  # distinct rows
            many.to_parquet(tmp / "tokenize.parquet")
            print("Tokenization: each way in its own process, by turns", flush=True)
            tokenize = common.by_turns(script, ["tok-trl", "tok-lexalign", "tok-cached"],
                                       {**spec, "tokenize_data": str(tmp / "tokenize.parquet")}, args.rounds, 2)

    def epoch_times(run: str) -> list[float]:
        times = [0.0] * args.epochs
        for step in steps[run]:
            times[step["step"] // args.steps_per_epoch] += step[clock]
        return times

    print(f"\nAlign with the reference step against without ({common.machine()}, {args.threads} thread(s), "
          f"{clock} time)")
    print(f"Llama {params / 1e6:.2f}M parameters (hidden {args.hidden}, {args.layers} layers), {args.batch} pairs "
          f"per step, {args.seq_len}-token sequences, {args.epochs} epochs of {args.steps_per_epoch} steps; the "
          f"four runs in turns, one step each")
    print(f"reference step (own process): {refstep[clock]:.1f} s {clock} for {len(frame)} pairs "
          f"(loading included), peak RSS {refstep['peak_mb']:.0f} MB")
    print(f"{'method':<6} {'epochs without (s)':>22} {'epochs with (s)':>22} {'ratio 2-3':>10} "
          f"{'ratio, whole run':>17}")
    for method in ("lora", "full"):
        online, ref = epoch_times(f"online-{method}"), epoch_times(f"reference-{method}")
        ratio = sum(ref[1:]) / sum(online[1:])
        whole = (refstep[clock] + sum(ref)) / sum(online)
        print(f"{method:<6} {' / '.join(f'{t:.1f}' for t in online):>22} {' / '.join(f'{t:.1f}' for t in ref):>22} "
              f"{ratio:>10.3f} {whole:>17.3f}")
    for method in ("lora", "full"):
        online, ref = epoch_times(f"online-{method}"), epoch_times(f"reference-{method}")
        ratio = sum(ref[1:]) / sum(online[1:])
        print(f"  {method}: epochs 2-3 with the reference file / without: {ratio:.3f} "
              f"({'<=' if ratio <= 0.8 else '>'} 0.8)")
    print("  (ratio, whole run: the reference step, model loading included, plus all epochs, over all epochs online)")

    if memory and args.device == "cuda":
        on, ref = memory["online-full"][0], memory["reference-full"][0]
        print(f"\nPeak GPU memory allocated, full fine-tuning (Llama {memory_params / 1e6:.1f}M parameters, hidden "
              f"{args.memory_hidden}, {args.memory_layers} layers, 2 steps of 2 pairs, each run in its own process)")
        print(f"  without the reference file: {on['peak_gpu_mb']:.0f} MB; with it: {ref['peak_gpu_mb']:.0f} MB "
              f"({ref['peak_gpu_mb'] / on['peak_gpu_mb']:.3f}x, {on['peak_gpu_mb'] - ref['peak_gpu_mb']:.0f} MB less); "
              f"the reference step peaked at {memory_ref['peak_gpu_mb']:.0f} MB")
    elif memory:
        on, ref = memory["online-full"][0], memory["reference-full"][0]
        print(f"\nPeak memory, full fine-tuning (Llama {memory_params / 1e6:.1f}M parameters, hidden "
              f"{args.memory_hidden}, {args.memory_layers} layers, 2 steps of 2 pairs, each run in its own process)")
        print(f"  without the reference file: peak RSS {on['peak_train_mb']:.0f} MB "
              f"(training added {on['peak_train_mb'] - on['baseline_mb']:.0f} MB)")
        print(f"  with the reference file:    peak RSS {ref['peak_train_mb']:.0f} MB "
              f"(training added {ref['peak_train_mb'] - ref['baseline_mb']:.0f} MB); the reference step, in its "
              f"own process, peaked at {memory_ref['peak_mb']:.0f} MB")
        print(f"  with / without: {ref['peak_train_mb'] / on['peak_train_mb']:.3f}, "
              f"{on['peak_train_mb'] - ref['peak_train_mb']:.0f} MB less (the weights alone: "
              f"{memory_params * 4 / 2**20:.0f} MB)")

    if tokenize:
        print(f"\nTokenization of {args.tokenize_rows} pairs ({args.seq_len}-token sequences, the demo's fast "
              f"tokenizer, 2 cores), median of {args.rounds} rounds by turns")
        base = {k: median(r[k] for r in tokenize["tok-trl"]) for k in ("cpu", "wall")}
        for name, label in (("tok-trl", "TRL DPOTrainer preparation (datasets.map)"),
                            ("tok-lexalign", "lexalign.reference, batched + parallel"),
                            ("tok-cached", "lexalign.reference, from the cache")):
            cpu, wall = (median(r[k] for r in tokenize[name]) for k in ("cpu", "wall"))
            print(f"  {label:<44} wall {wall:6.2f} s ({wall / base['wall']:.3f}x)   "
                  f"cpu {cpu:6.2f} s ({cpu / base['cpu']:.3f}x)")


if __name__ == "__main__":
    main()
