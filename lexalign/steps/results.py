"""The steps that tell what a run gave: evaluate, lm_eval (benchmarks), report and publish."""

from __future__ import annotations

from pathlib import Path

from lexalign.config.sections import EvaluateConfig, PublishConfig
from lexalign.core.errors import LexAlignError
from lexalign.core.io import write_json
from lexalign.steps import one


def evaluate(*, aligned: str | Path, reference: str | Path, data: str | Path, output: str | Path, evaluate: dict,
             beta: float, seed: int = 42, ranked: str | Path | list | None = None,
             reward_model: str | Path | list | None = None, device: str = "cpu") -> dict | None:
    """Score one run on the held-out pairs (and on ranked groups of K, when given) against its reference model;
    generate both models' answers to held-out prompts and judge them (the evaluate section's judge).

    `ranked`: the validated groups of K (a folder, or a one-element list from the rule; empty: none).
    `reward_model`: the downloaded reward model (judge reward_model), likewise. The json is written only once
    everything succeeded (atomically): a failed judge leaves no half-written result. Launched in several
    processes (scale.evaluate), each scores its share and the main process writes the json and returns it
    (lexalign.core.shares); the others return None."""
    from lexalign.core.shares import session
    from lexalign.data.validated import read_validated
    from lexalign.evaluation.figures import evaluate as _evaluate
    from lexalign.evaluation.figures import summary
    from lexalign.models.loading import resolve_device

    ranked, reward_model = one(ranked), one(reward_model)
    _, evals = read_validated(data)
    ranked_eval = read_validated(ranked)[1] if ranked else None
    with session(output) as share:
        result = _evaluate(Path(aligned), Path(reference), evals, EvaluateConfig.from_dict(evaluate), beta, seed,
                           ranked_eval, Path(reward_model) if reward_model else None, resolve_device(device), share)
    if result is None:
        return None  # not the main process: it writes the json
    write_json(output, result)
    print(summary(result), flush=True)
    from lexalign.train.tracking import log_evaluation

    log_evaluation(aligned, result, output)  # into the run's trackers, when its training reported to any
    return result


def lm_eval(*, model: str | Path, output: str | Path, lm_eval: dict, sft: str | Path | list | None = None,
            device: str = "auto", seed: int = 42) -> dict:
    """EleutherAI's lm-evaluation-harness on `model` (the lm_eval block of the evaluate section); with `sft` (the
    SFT model's own results file) the result also holds `lm_eval: {task: {metric: {sft, aligned}}}`."""
    from lexalign.core.io import read_json
    from lexalign.evaluation.harness import compare, run_harness, summary
    from lexalign.models.loading import resolve_device

    sft = one(sft)
    result = run_harness(Path(model), lm_eval, resolve_device(device), seed)
    if sft:
        result["lm_eval"] = compare(read_json(sft)["results"], result["results"])
    write_json(output, result)
    print(summary(result), flush=True)
    return result


def report(*, evals: list[str], models: list[str], validated: str | Path | list, tokenizer: str | Path,
           page: str | Path,
           plots: str | Path, runs: list[str], lm_evals: list[str] | None = None,
           online: list[str] | None = None) -> Path:
    """The HTML report comparing every run (lists are in the order of `runs`; `lm_evals` empty when no lm-eval
    tasks are configured; `online`: each online round's eval.json, in round order, empty without rounds;
    `validated` an empty list, and the runs none, when the rounds run alone: online.offline false)."""
    from lexalign.evaluation.report import build_report

    benchmarks = dict(zip(runs, map(Path, lm_evals), strict=True)) if lm_evals else {}
    out = build_report(dict(zip(runs, map(Path, evals), strict=True)), dict(zip(runs, map(Path, models), strict=True)),
                       Path(one(validated)) if one(validated) else None, Path(tokenizer), Path(page), Path(plots),
                       benchmarks,
                       [Path(e).parent for e in online or []])
    print(f"Report written to {out}", flush=True)
    return out


def publish(*, model: str | Path, publish: dict, evaluation: str | Path | list | None = None,
            output: str | Path | None = None) -> dict:
    """Upload a model folder to the Hugging Face Hub (`publish`: the publish section) as one commit, with a model
    card holding its evaluation (`evaluation`: its eval.json, or a one-element list from the rule); `output`
    records the commit (never the token)."""
    if isinstance(evaluation, (list, tuple)):
        evaluation = evaluation[0] if evaluation else None
    from lexalign.hub.push import push

    cfg = PublishConfig.from_dict(publish)
    if not cfg.repo_id:
        raise LexAlignError("publish.repo_id is not set: there is nowhere to publish to",
                            hint="Set publish.repo_id: owner/name in the config (or run lexalign push --repo-id)")
    result = push(Path(model), cfg.repo_id, private=cfg.private, revision=cfg.revision,
                  evaluation=Path(evaluation) if evaluation else None, commit_message=cfg.commit_message)
    if output:
        write_json(output, result)
    print(f"Published {model} to {result['repo_id']} (revision {result['revision']}): {result['commit_url']}",
          flush=True)
    return result

