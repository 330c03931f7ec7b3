"""Benchmark (not a test): the whole DPO job, raw JSONL to trained adapter, `lexalign align` against a plain
TRL `DPOTrainer` script, side by side on a realistic long-tailed length mix and two vocabularies.

    python benchmarks/bench_job_vs_trl.py                       # 32k and 150k vocabularies, 2 rounds
    python benchmarks/bench_job_vs_trl.py --pairs 16 --rounds 1 --vocab 32000   # a quick run
    python benchmarks/bench_job_vs_trl.py --device cuda --hidden 1024 --layers 12 --pairs 256
    python benchmarks/bench_job_vs_trl.py --smollm2 --pairs 32 --rounds 3     # a real body: SmolLM2-135M-Instruct
    python benchmarks/bench_job_vs_trl.py --model DIR --pairs 32               # any model folder (with a tokenizer)

`--smollm2`: SmolLM2-135M-Instruct converted from its GGUF (`lexalign.hub.gguf.convert_gguf`, fp32 weights) found
at $LEXALIGN_SMOLLM2_GGUF or ./assets/SmolLM2-135M-Instruct.gguf, into the work folder once; `--model DIR` takes a
converted (or any Hugging Face) model folder instead. Without either, the zoo Llama of `--vocab`, `--hidden`,
`--layers`.

Both jobs start from the same JSONL file (prompt / chosen / rejected plain text), the same SFT model (a
Llama of `--hidden` and `--layers` with a `--vocab` vocabulary; the tokenizer is the zoo's Llama-3-style
byte-level BPE, testkit/zoo.py) and the same hyperparameters: LoRA r 16 on q/v, batch 4 pairs, one epoch,
learning rate 5e-6, beta 0.1, max_length 1024, seed 0.

* `trl`: `load_dataset("json")`, `DPOTrainer(model, DPOConfig(...), peft_config=LoraConfig(...))`,
  `train()`, `save_model()`: TRL's defaults for everything else (the reference computed online every
  step, padded batches, its fused LM head), except two switched off so that both sides compute in fp32
  without recomputation: bf16 autocast and activation checkpointing (TRL's defaults turn both on, on a CPU
  too, which makes TRL slower here still).
* `lexalign`: `lexalign align --config ...`: validation of the raw file, the reference log-probs once
  (packed), DPO on padding-free batches with the lean LM head (`lexalign.models.packing`, `lexalign.train.packed`,
  `lexalign.models.logprobs`), the adapter saved and merged.
* `lexalign-padded` (with `--ablation`): the same with `alignment.padding_free: false`: TRL's padded
  training batches, so the packing's share of the speed-up shows apart from the lean head's and the
  reference's.
* `lexalign-unshared` (with `--ablation`): packed training batches without prompt sharing
  (`lexalign.train.packed.PREFIX_SHARING = False`: each sequence whole, rows as wide as the longest).
* `lexalign-not-lean` (with `--lean-ablation`): the packed job with transformers' own RMSNorm and SwiGLU MLP
  instead of the CPU's lean layers (`lexalign.models.kernels.apply_lean_layers`): their share of the memory.
* `trl-bf16` and `lexalign-bf16` (with `--bf16`): both in bf16, each its own way: TRL with `bf16=True` (its
  default: autocast over the float32 model it loaded), LexAlign with `alignment.bf16: auto` (frozen weights stored
  in bf16 where the CPU multiplies it in hardware, autocast, the reference in bf16). The like-for-like pairs are
  trl / lexalign (float32) and trl-bf16 / lexalign-bf16; each side is also printed against float32 TRL.
* `before` (with `--against DIR`): `lexalign align` from another checkout of LexAlign (e.g. `git archive HEAD`
  unpacked into DIR), run by that checkout's copy of this script: a before/after comparison by turns.

Each job runs in a process of its own (its start-up and imports included in its time); rounds alternate
which side goes first. Tokens/s: the real tokens of the data (prompt + chosen and prompt + rejected, in the
model's tokenizer, padding excluded) over the job's wall time; peak memory: the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LEARNING_RATE, BATCH, BETA, MAX_LENGTH, LORA_R, LORA_ALPHA = 5e-6, 4, 0.1, 1024, 16, 32


def _length(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    return max(2, min(cap, int(math.exp(rng.gauss(math.log(median), sigma)))))


def smollm2_folder(root: Path) -> Path:
    """SmolLM2-135M-Instruct as a model folder, converted once from its GGUF ($LEXALIGN_SMOLLM2_GGUF, else
    ./assets/SmolLM2-135M-Instruct.gguf) by `lexalign.hub.gguf.convert_gguf`."""
    from lexalign.core.io import atomic_dir
    from lexalign.hub.gguf import convert_gguf

    out = root / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    gguf = Path(os.environ.get("LEXALIGN_SMOLLM2_GGUF") or REPO / "assets" / "SmolLM2-135M-Instruct.gguf")
    if not gguf.is_file():
        raise SystemExit(f"No SmolLM2 GGUF at {gguf}: set LEXALIGN_SMOLLM2_GGUF, or give a model folder (--model DIR)")
    with atomic_dir(out) as tmp:
        convert_gguf(gguf, tmp)
    return out


def write_inputs(root: Path, vocab: int, pairs: int, hidden: int, layers: int, seed: int = 0,
                 model: Path | None = None) -> dict:
    """The SFT model folder (`model`, else a zoo Llama of this size) and the raw JSONL (log-normal lengths: prompts
    median 50, responses 100)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from testkit import zoo

    model_dir = model or root / f"model-{vocab}"
    if not (model_dir / "config.json").is_file():
        zoo.build("llama3", model_dir)  # the tokenizer (and generation config); the model is replaced
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                             num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 2),
                             num_key_value_heads=max(hidden // 128, 1), max_position_embeddings=2048,
                             bos_token_id=None, eos_token_id=None)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Words that are one token each after a space, so a text of n words is n tokens.
    words = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha())
    words = [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    data = root / f"preferences-{vocab}.jsonl"
    rows = [{"prompt": text(_length(rng, 50, 0.6, 380)), "chosen": text(_length(rng, 100, 0.7, 580)),
             "rejected": text(_length(rng, 100, 0.7, 580))} for _ in range(pairs)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    count = lambda s: len(tokenizer(s)["input_ids"]) + 1  # noqa: E731  (BOS where it adds one, + EOS)
    real = sum(2 * count(r["prompt"]) + count(r["chosen"]) + count(r["rejected"]) - 2 for r in rows)
    lengths = sorted(count(r["prompt"]) + max(count(r["chosen"]), count(r["rejected"])) for r in rows)
    # What padded batches of BATCH pairs in file order compute (TRL shuffles: about the same share).
    sides = [(count(r["prompt"]) + count(r["chosen"]) - 1, count(r["prompt"]) + count(r["rejected"]) - 1)
             for r in rows]
    padded = sum(2 * len(b) * min(MAX_LENGTH, max(max(s) for s in b))
                 for b in (sides[i:i + BATCH] for i in range(0, len(sides), BATCH)))
    return {"model": str(model_dir), "data": str(data), "tokens": real, "vocab": len(tokenizer),
            "longest": lengths[-1], "median": lengths[len(lengths) // 2], "padding": 1 - real / padded}


def run_trl(model: str, data: str, out: str, device: str, bf16: bool = False) -> None:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model)
    dataset = load_dataset("json", data_files=data, split="train")
    args = DPOConfig(output_dir=out, per_device_train_batch_size=BATCH, learning_rate=LEARNING_RATE, beta=BETA,
                     num_train_epochs=1, max_length=MAX_LENGTH, seed=0, report_to=[], save_strategy="no",
                     use_cpu=device == "cpu", bf16=bf16, activation_checkpointing=False, disable_tqdm=True)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.05,
                                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model(out)


def run_lexalign(model: str, data: str, out: str, device: str, padding_free: bool = True, bf16=None) -> None:
    import yaml

    from lexalign.cli import main

    config = {
        "model": {"path": model},
        "dataset": {"path": data, "eval_fraction": 0.0, "max_length": MAX_LENGTH},
        "alignment": {"method": "dpo", "beta": BETA, "learning_rate": LEARNING_RATE, "batch_size": BATCH,
                      "gradient_accumulation_steps": 1, "num_epochs": 1, "max_length": MAX_LENGTH,
                      "use_lora": True, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.05,
                      "target_modules": ["q_proj", "v_proj"], "warmup_steps": 0, "weight_decay": 0.0,
                      "padding_free": padding_free, "bf16": bf16,
                      "save_steps": 100000, "seed": 0, "output_dir": out, "checkpoint_dir": out + "-checkpoints"},
        "device": device,
        "seed": 0,
    }
    path = Path(out + ".yaml")
    path.write_text(yaml.safe_dump(config))
    main(["align", "--config", str(path)], standalone_mode=False)


def child(side: str, model: str, data: str, out: str, device: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    if side in ("trl", "trl-bf16"):
        run_trl(model, data, out, device, bf16=side == "trl-bf16")
    else:
        if side == "lexalign-unshared":
            from lexalign.train import packed

            packed.PREFIX_SHARING = False
        if side == "lexalign-not-lean":
            from lexalign.models import loading

            loading.lean_for_training = lambda model, *args, **kwargs: model
        run_lexalign(model, data, out, device, padding_free=side != "lexalign-padded",
                     bf16="auto" if side == "lexalign-bf16" else None)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + json.dumps({"seconds_in_process": time.perf_counter() - start, "peak_mb": peak_mb,
                                  "cpu_s": usage.ru_utime + usage.ru_stime}))


def measure(side: str, inputs: dict, root: Path, tag: str, device: str, threads: int,
            against: str | None = None) -> dict:
    out = str(root / f"{side}-{tag}")
    for stale in (out, out + "-checkpoints"):  # a job that finds its outputs (or reference file) does less
        shutil.rmtree(stale, ignore_errors=True)
    script = str(Path(against) / "benchmarks" / Path(__file__).name) if side == "before" else __file__
    command = [sys.executable, script, "--child", "lexalign" if side == "before" else side, "--model",
               inputs["model"], "--data", inputs["data"], "--out", out, "--device", device, "--threads", str(threads)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=root)
    seconds = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{side} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    return {"seconds": seconds, "tokens_per_s": inputs["tokens"] / seconds, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["trl", "lexalign", "lexalign-padded", "lexalign-unshared",
                                            "lexalign-not-lean", "trl-bf16", "lexalign-bf16"])
    parser.add_argument("--bf16", action="store_true",
                        help="also both in bf16: TRL with bf16=True, LexAlign with alignment.bf16: auto")
    parser.add_argument("--ablation", action="store_true",
                        help="also lexalign with padding_free: false, and packed without prompt sharing")
    parser.add_argument("--lean-ablation", action="store_true",
                        help="also lexalign without the CPU's lean RMSNorm and SwiGLU layers")
    parser.add_argument("--against", metavar="DIR",
                        help="also `lexalign align` from the LexAlign checkout in DIR (side `before`)")
    parser.add_argument("--model", help="a model folder to train (default: the zoo Llama of --vocab/--hidden/--layers)")
    parser.add_argument("--smollm2", action="store_true",
                        help="SmolLM2-135M-Instruct converted from $LEXALIGN_SMOLLM2_GGUF "
                             "(else ./assets/SmolLM2-135M-Instruct.gguf)")
    parser.add_argument("--data")
    parser.add_argument("--out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 150000])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    a = parser.parse_args()
    if a.child:
        child(a.child, a.model, a.data, a.out, a.device, a.threads)
        return
    import tempfile

    root = Path(a.workdir or tempfile.mkdtemp(prefix="bench-job-"))
    root.mkdir(parents=True, exist_ok=True)
    model = Path(a.model).resolve() if a.model else smollm2_folder(root) if a.smollm2 else None
    body = f"model {model}" if model else f"Llama hidden {a.hidden} x {a.layers} layers"
    print(f"{a.pairs} pairs, batch {BATCH}, 1 epoch, {body}, {a.threads} threads, device {a.device}; work in {root}",
          flush=True)
    results: dict = {}
    if model:  # the model's own vocabulary
        a.vocab = [0]
    inputs = {v: write_inputs(root, v, a.pairs, a.hidden, a.layers, model=model) for v in a.vocab}
    for i in inputs.values():
        print(f"vocab {i['vocab']}: {i['tokens']} real tokens, pair lengths median {i['median']}, "
              f"longest {i['longest']}; padded batches of {BATCH} pairs would be {i['padding']:.0%} padding")
    sides = ["trl", "lexalign", *(["lexalign-padded", "lexalign-unshared"] if a.ablation else []),
             *(["lexalign-not-lean"] if a.lean_ablation else []),
             *(["trl-bf16", "lexalign-bf16"] if a.bf16 else []),
             *(["before"] if a.against else [])]
    for r in range(a.rounds):
        for v in a.vocab:
            order = list(sides)
            if (r + a.vocab.index(v)) % 2:
                order.reverse()
            for side in order:
                got = measure(side, inputs[v], root, f"{v}-{r}", a.device, a.threads, a.against)
                results.setdefault((v, side), []).append(got)
                print(f"round {r + 1} vocab {inputs[v]['vocab']} {side:17s} {got['seconds']:7.1f} s  "
                      f"{got['tokens_per_s']:8.1f} tok/s  peak {got['peak_mb']:7.0f} MB  "
                      f"CPU {got.get('cpu_s', float('nan')):7.1f} s", flush=True)
    mid = statistics.median
    for v in a.vocab:
        trl = results[(v, "trl")]
        print(f"\nvocab {inputs[v]['vocab']}: TRL {mid([t['tokens_per_s'] for t in trl]):.1f} tok/s, "
              f"{mid([t['peak_mb'] for t in trl]):.0f} MB (medians of {len(trl)} rounds)")
        print("side               tok/s   speed vs TRL (each round)        peak MB  memory vs TRL")
        for side in sides[1:]:
            runs = results[(v, side)]
            ratios = sorted(t["seconds"] / x["seconds"] for t, x in zip(trl, runs, strict=True))
            memory = sorted(x["peak_mb"] / t["peak_mb"] for t, x in zip(trl, runs, strict=True))
            print(f"{side:17s} {mid([x['tokens_per_s'] for x in runs]):7.1f}   {mid(ratios):5.2f}x "
                  f"({', '.join(f'{x:.2f}' for x in ratios)})  {mid([x['peak_mb'] for x in runs]):10.0f}"
                  f"   {mid(memory):4.2f}x ({', '.join(f'{x:.2f}' for x in memory)})")
            if all("cpu_s" in x for x in (*trl, *runs)):  # the processes' CPU time: steadier on a shared machine
                cpu = sorted(t["cpu_s"] / x["cpu_s"] for t, x in zip(trl, runs, strict=True))
                print(f"{'':17s} CPU time: TRL / {side} {mid(cpu):.2f}x ({', '.join(f'{x:.2f}' for x in cpu)})")
        if a.bf16:  # like for like: both in bf16
            base, runs = results[(v, "trl-bf16")], results[(v, "lexalign-bf16")]
            ratios = sorted(t["seconds"] / x["seconds"] for t, x in zip(base, runs, strict=True))
            memory = sorted(x["peak_mb"] / t["peak_mb"] for t, x in zip(base, runs, strict=True))
            print(f"bf16 both: lexalign-bf16 vs trl-bf16 {mid(ratios):.2f}x the speed "
                  f"({', '.join(f'{x:.2f}' for x in ratios)}), {mid(memory):.2f}x the peak memory "
                  f"({', '.join(f'{x:.2f}' for x in memory)})")
        for side in [s for s in sides[2:] if s not in ("trl-bf16", "lexalign-bf16")]:
            runs, lex = results[(v, side)], results[(v, "lexalign")]
            gain = sorted(x["seconds"] / y["seconds"] for x, y in zip(runs, lex, strict=True))
            print(f"  lexalign vs {side}: {mid(gain):.2f}x the speed ({', '.join(f'{x:.2f}' for x in gain)}), "
                  f"{mid([y['peak_mb'] for y in lex]) / mid([x['peak_mb'] for x in runs]):.2f}x the peak memory")


if __name__ == "__main__":
    main()
