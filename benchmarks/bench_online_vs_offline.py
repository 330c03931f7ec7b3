"""Benchmark (not a test): offline DPO vs rounds of on-policy best-vs-worst DPO vs rounds of ranked GDPO on the
demo, at the same number of optimizer steps, each final model against the same SFT model (issue #25).

    .venv/bin/python benchmarks/bench_online_vs_offline.py                      # 3 rounds of 8 steps: 24 steps each
    .venv/bin/python benchmarks/bench_online_vs_offline.py --steps-per-round 16 --keep /tmp/bench-online

Every arm runs through the real pipeline (`snakemake`) in a copy of the workflow
(`lexalign.pipeline.workflow_files.copy_workflow`), with configs derived from the demo
config (config/config.yaml, its sweep and lm-eval tasks left out) and the online
example (config/examples/online.yaml):

1. `base`: `snakemake results/models/sft`: the SFT model, once. Each arm is a copy
   of this folder (its results and Snakemake's records), so all three start from
   the same SFT weights and Snakemake plans no SFT job again.
2. `offline DPO`: `results/aligned` and `results/eval/aligned.json`: DPO on the
   demo's preference data (best vs worst of its 4 ranked answers, a polite vs a rude
   greeting), the SFT model as reference, `rounds × steps-per-round` optimizer steps.
3. `online DPO`: `results/online/final`: the online example's rounds (64 prompts
   × 16 samples at T = 1, the demo judge, `reference: previous`), best vs worst,
   `steps-per-round` optimizer steps a round.
4. `online GDPO`: the same rounds, `select: ranked`, GDPO on groups of 4
   (`group_delay_size: 4`, `group_delay_weight: 0.5`, as the demo's sweep run).

Every arm trains with the example's round settings (lr 5e-3, batch 4 pairs or
groups, beta 0.1, no warm-up, no accumulation, LoRA) and `max_steps`, so the
optimizer steps are equal whatever each round selects (each round's linear decay
restarts: that is what rounds are). The steps are read back from each model's
`metrics.jsonl` and printed.

The greedy held-out polite rate saturates at 100% on the demo after one round, so
the figures that compare the arms are sampled: each final model (and the SFT
model) draws `--samples` answers at temperature 1 (as the rounds sample: the
online example's `max_new_tokens`) to each of the 40 held-out demo prompts, with
`lexalign.generation.sampling` and the same seeds for every model. The demo judge
scores each answer (1: a polite greeting); the figures, each with a seeded
bootstrap 95% interval over the 40 prompts (`lexalign.generation.judges.bootstrap_interval`):

* sampled polite rate (the judge's mean score);
* sampled win rate against SFT: answer j of the model against answer j of SFT to
  the same prompt (`judges.compare`: ties count half), averaged per prompt;
* the difference of each online arm's polite rate from offline DPO's, paired by prompt;
* the pipeline's own greedy win rate (`results/eval/aligned.json`,
  `results/online/round-R/eval.json`: the same 40 prompts, the demo judge);
* Monte Carlo KL(model || SFT) on `--kl-repeats` samples per held-out prompt
  (`lexalign.evaluation.answers.kl_estimate`), and the mean sampled answer length.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lexalign.pipeline.workflow_files import copy_workflow  # noqa: E402 - this checkout's package

GDPO = {"method": "gdpo", "group_delay_size": 4, "group_delay_weight": 0.5}
ARMS = ("offline DPO", "online DPO", "online GDPO")


def configs(steps: int, rounds: int) -> dict[str, dict]:
    """Each arm's config: the demo config with the online example's round settings (and its online section)."""
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    example = yaml.safe_load((REPO / "config" / "examples" / "online.yaml").read_text())
    demo.pop("runs", None)  # the sweep (gdpo-k4): not an arm here
    evaluate = {**demo["evaluate"], **example["evaluate"]}
    evaluate.pop("lm_eval", None)
    online = {**example["online"], "rounds": rounds}
    step = {**online.pop("alignment"), "gradient_accumulation_steps": 1, "warmup_steps": 0, "logging_steps": 1}
    base = {**demo, "evaluate": evaluate, "alignment": {**demo["alignment"], **step}}
    return {
        "base": base,
        "offline DPO": {**base, "alignment": {**base["alignment"], "max_steps": steps * rounds}},
        "online DPO": {**base, "online": {**online, "select": "best_worst", "alignment": {"max_steps": steps}}},
        "online GDPO": {**base, "online": {**online, "select": "ranked",
                                           "alignment": {**GDPO, "max_steps": steps}}},
    }


def snakemake(workdir: Path, targets: list[str], cores: int) -> float:
    """Runs `snakemake --cores N targets` in `workdir`; returns its wall seconds."""
    started = time.perf_counter()
    result = subprocess.run([str(BIN / "snakemake"), "--cores", str(cores), *targets], cwd=workdir,
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    (workdir / "snakemake.out").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(targets)} failed in {workdir}:\n{result.stderr[-4000:]}")
    jobs = [line.split()[1].rstrip(":") for line in result.stderr.splitlines() + result.stdout.splitlines()
            if line.startswith(("rule ", "localrule "))]
    if workdir.name != "base" and {"finetune", "download_model"} & set(jobs):
        raise SystemExit(f"{workdir.name} trained its own SFT model: the arms must share the base one")
    print(f"  {workdir.name}: {len(jobs)} jobs in {wall:.0f} s ({', '.join(sorted(set(jobs)))})", flush=True)
    return wall


def trained_steps(model: Path) -> int:
    """The last optimizer step in a model's training curve."""
    steps = [json.loads(line).get("step") for line in (model / "metrics.jsonl").read_text().splitlines() if line]
    return max(s for s in steps if s is not None)


def sample_scores(model: Path, out: Path, prompts: list[str], samples: int, max_new_tokens: int, seed: int):
    """(per prompt: the demo judge's score of each sampled answer, per prompt: each answer's token count,
    the share of answers cut at max_new_tokens)."""
    from lexalign.demo import task
    from lexalign.generation.sampling import Sampling, generate, read_generations

    generate(model, prompts, out, Sampling(samples_per_prompt=samples, temperature=1.0, top_p=1.0,
                                           max_new_tokens=max_new_tokens, seed=seed),
             batch_size=40, device="cpu", rendered=True)
    rows = sorted(read_generations(out).to_pylist(), key=lambda r: r["row"])
    assert len(rows) == len(prompts), "a held-out prompt was skipped"
    return ([[float(task.judge(c)) for c in r["completions"]] for r in rows],
            [[len(ids) for ids in r["completion_ids"]] for r in rows],
            mean(t for r in rows for t in r["truncated"]))


def kl_to_sft(model: Path, sft: Path, prompts: list[str], max_new_tokens: int, seed: int, repeats: int) -> float:
    from lexalign.evaluation.answers import kl_estimate
    from lexalign.generation.sampling import render_prompts
    from lexalign.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model)
    texts, chat = render_prompts(tokenizer, prompts * repeats, True)
    policy, reference = (load_causal_lm(m, "cpu").eval() for m in (model, sft))
    return kl_estimate(policy, reference, tokenizer, texts, max_new_tokens, seed, 40, chat)["mean"]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def interval(per_prompt: list[float], seed: int) -> str:
    from lexalign.generation.judges import bootstrap_interval

    low, high = bootstrap_interval(per_prompt, seed)
    return f"{100 * mean(per_prompt):5.1f}% ({100 * low:.1f}–{100 * high:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-per-round", type=int, default=8, help="optimizer steps of each online round; "
                        "offline DPO trains rounds × this")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16, help="sampled answers per held-out prompt")
    parser.add_argument("--kl-repeats", type=int, default=4, help="KL samples per held-out prompt")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="work here (kept) instead of a temporary folder")
    args = parser.parse_args()
    print("Command:", shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)

    from transformers.utils import logging

    from lexalign.demo import task
    from lexalign.generation.judges import bootstrap_interval, compare

    logging.disable_progress_bar()  # a bar per model loaded

    arms = configs(args.steps_per_round, args.rounds)
    seed = arms["base"]["seed"]
    max_new_tokens = arms["online DPO"]["online"]["sampling"]["max_new_tokens"]
    held_out = task.eval_prompts(seed, 40)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        base = root / "base"
        if not (base / "results" / "models" / "sft").is_dir():
            shutil.rmtree(base, ignore_errors=True)
            copy_workflow(base)
            (base / "config" / "config.yaml").write_text(yaml.safe_dump(arms["base"], sort_keys=False))
            print("SFT once: snakemake results/models/sft", flush=True)
            snakemake(base, ["results/models/sft"], args.cores)
        walls, models, folders = {}, {"SFT": base / "results" / "models" / "sft"}, {}
        for arm in ARMS:
            folder = folders[arm] = root / arm.replace(" ", "-").lower()
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(base, folder, symlinks=True)
            (folder / "config" / "config.yaml").write_text(yaml.safe_dump(arms[arm], sort_keys=False))
            offline = arm == "offline DPO"
            targets = ["results/aligned", "results/eval/aligned.json"] if offline else ["results/online/final"]
            print(f"{arm}: snakemake {' '.join(targets)}", flush=True)
            walls[arm] = snakemake(folder, targets, args.cores)
            models[arm] = folder / "results" / ("aligned" if offline else "online/final")
        for r in range(1, args.rounds):  # the online arms' earlier rounds, for the curve
            for arm in ARMS[1:]:
                models[f"{arm}, round {r}"] = folders[arm] / "results" / "online" / f"round-{r}" / "model"

        print(f"Sampling {args.samples} answers to each of {len(held_out)} held-out prompts from each model ...",
              flush=True)
        scores, lengths, capped, kl = {}, {}, {}, {}
        for name, model in models.items():
            folder = root / "samples" / name.replace(" ", "-").replace(",", "")
            scores[name], lengths[name], capped[name] = sample_scores(model, folder, held_out, args.samples,
                                                                      max_new_tokens, seed)
            if name != "SFT":
                kl[name] = kl_to_sft(model, models["SFT"], held_out, max_new_tokens, seed, args.kl_repeats)
        steps = {arm: (trained_steps(models[arm]) if arm == "offline DPO" else
                       [trained_steps(folders[arm] / "results" / "online" / f"round-{r}" / "model")
                        for r in range(1, args.rounds + 1)]) for arm in ARMS}
        greedy = {"offline DPO": json.loads((folders["offline DPO"] / "results" / "eval" / "aligned.json")
                                            .read_text())["judge"]}
        rounds = {}
        for arm in ARMS[1:]:
            online = folders[arm] / "results" / "online"
            greedy[arm] = json.loads((online / f"round-{args.rounds}" / "eval.json").read_text())["judge"]
            rounds[arm] = [json.loads((online / f"round-{r}" / "selection.json").read_text())
                           for r in range(1, args.rounds + 1)]
    total = time.perf_counter() - started

    polite = {name: [mean(s) for s in per] for name, per in scores.items()}
    wins = {name: [mean(compare(a, b) for a, b in zip(scores["SFT"][i], s, strict=True))
                   for i, s in enumerate(per)] for name, per in scores.items() if name != "SFT"}
    n = args.samples * len(held_out)
    print(f"\nOnline rounds vs offline DPO on the demo: {args.rounds} × {args.steps_per_round} optimizer steps, "
          f"seed {seed}; sampled figures: {args.samples} answers × {len(held_out)} held-out prompts = {n} per model, "
          f"T = 1, {max_new_tokens} new tokens; bootstrap 95% CI over prompts")
    header = (f"{'model':<24} {'optimizer steps':<16} {'sampled polite rate':<22} {'sampled win rate vs SFT':<24} "
              f"{'Δ polite vs offline':<22} {'greedy win rate vs SFT':<24} {'KL to SFT':>9} {'tokens':>7} "
              f"{'capped':>7}")
    print(header)
    print("-" * len(header))
    for name in models:
        arm = name.split(",")[0]
        step = "—" if name == "SFT" else (
            str(steps[arm]) if arm == "offline DPO" else
            (f"{sum(steps[arm])} ({'+'.join(map(str, steps[arm]))})" if name == arm
             else str(sum(steps[arm][:int(name[-1])]))))
        diff = "—"
        if name in ARMS[1:]:
            delta = [a - b for a, b in zip(polite[name], polite["offline DPO"], strict=True)]
            low, high = bootstrap_interval(delta, seed)
            diff = f"{100 * mean(delta):+5.1f} ({100 * low:+.1f}–{100 * high:+.1f})"
        judged = greedy.get(name)
        greedy_text = "—" if judged is None else \
            f"{100 * judged['win_rate']:.0f}% ({100 * judged['ci_low']:.0f}–{100 * judged['ci_high']:.0f})"
        print(f"{name:<24} {step:<16} {interval(polite[name], seed):<22} "
              f"{interval(wins[name], seed) if name in wins else '—':<24} {diff:<22} {greedy_text:<24} "
              f"{kl[name] if name in kl else 0:9.2f} {mean(x for per in lengths[name] for x in per):7.1f} "
              f"{100 * capped[name]:6.0f}%")
    print(f"\nA step: {arms['base']['alignment']['batch_size']} pairs (DPO: 2 sequences each) or groups (GDPO: "
          f"{GDPO['group_delay_size']} each), lr {arms['base']['alignment']['learning_rate']} decaying linearly to 0 "
          f"over each job's steps, no warm-up; references: SFT (offline), the previous round's model (online). "
          f"tokens: mean sampled answer length, its end id included; capped: cut at {max_new_tokens} tokens")
    online = arms["online DPO"]["online"]
    print(f"\nThe online arms' training samples (each round's, drawn from the model the round starts from, "
          f"{online['prompts']['per_round']} prompts × {online['samples_per_prompt']}): judged polite rate, "
          f"selected pairs/groups (ties / all tied dropped)")
    for arm, selections in rounds.items():
        print(f"  {arm}: " + "; ".join(
            f"round {r}: {100 * s['mean_score']:.1f}% polite, {s['selected']} selected "
            f"({s.get('ties', 0) + s.get('all_tied', 0)} tied, {s.get('too_few', 0)} too few distinct)"
            for r, s in enumerate(selections, start=1)))
    print(f"\nWall time of each arm's snakemake ({args.cores} cores): "
          + ", ".join(f"{a} {w:.0f} s" for a, w in walls.items()) + f"; the whole benchmark {total:.0f} s")


if __name__ == "__main__":
    main()
