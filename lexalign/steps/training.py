"""One function per pipeline step: the whole contract of each Snakemake rule, in one place.

A rule's named `input:`, `output:` and `params:` are this function's keyword
arguments, by the same names (`scripts/step.py` passes them through
`lexalign.pipeline.rules.run_rule`, unchanged and by name); the CLI calls the same
functions. Each takes plain paths and the validated config sections, so the
rule's params (what Snakemake watches for changes) are exactly what the step
reads. `run(step, **arguments)` checks the names before the step starts.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from lexalign.config.sections import (
    AlignConfig,
    DatasetConfig,
    EvaluateConfig,
    FinetuneConfig,
    PublishConfig,
    SftDatasetConfig,
    SourceConfig,
)
from lexalign.core.errors import LexAlignError
from lexalign.core.io import write_json
from lexalign.core.tokens import CHAT_ATTR


def download(*, output: str | Path, source: dict, kind: str, seed: int = 42) -> Path:
    """Fetch a model or dataset (`kind`) from the demo, a local path or the Hub into `output`.

    `source`: the source keys of the model or dataset section, and a dataset's `data_dir` (its sub-folder)."""
    from lexalign.hub.sources import fetch

    source = dict(source)
    data_dir = source.pop("data_dir", None)
    cfg = SourceConfig.from_dict(source)
    out = fetch(cfg, output, kind, seed, data_dir=data_dir)
    print(f"Fetched {kind} from {cfg.source} into {out}", flush=True)
    return out


def prepare_sft(*, raw: str | Path, output: str | Path, data: dict, seed: int = 42) -> dict:
    """SFT data (`data`: the sft_data section) from the download in `raw` into train/eval files in `output`."""
    from lexalign.core.lineage import stage_record
    from lexalign.data.common import write_split_outputs
    from lexalign.data.sft import prepare_sft as _prepare

    cfg = SftDatasetConfig.from_dict({**data, "path": str(raw)})
    result = _prepare(cfg, seed)
    lineage = stage_record("prepare_sft_data", cfg.to_dict(), {"data": raw})
    write_split_outputs(output, result, lineage)
    report = result["report"]
    print(f"SFT data ({report['shape']}): {report['train_rows']} train + {report['eval_rows']} eval, "
          f"{report['rejected_rows']} rejected → {output}", flush=True)
    return report


def validate(*, raw: str | Path, tokenizer: str | Path, output: str | Path, dataset: dict, seed: int = 42,
             trust_remote_code: bool = False, kto_weights: dict | None = None, pairs_only: bool = False) -> dict:
    """Validate preference data into train/eval parquet, rejects and report (streamed, memory bounded by
    batches); then gate: too many rejects, or nothing left, stops here with the summary.

    `kto_weights` (run → its desirable_weight and undesirable_weight): the KTO runs that read these data; the
    balance of their training rows under each run's weights goes into the report and the summary, with a
    warning where it is outside KTO's recommended range. `pairs_only`: a method that needs pairs reads these
    data, so unpaired rows stop here (before any reference step)."""
    from lexalign.core.errors import warn
    from lexalign.core.lineage import stage_record
    from lexalign.data.validation import gate, summary, validate_to_dir
    from lexalign.models.loading import load_tokenizer

    cfg = DatasetConfig.from_dict({**dataset, "path": str(raw)})
    lineage = stage_record("validate", cfg.to_dict(), {"data": raw, "tokenizer": tokenizer})
    report = validate_to_dir(cfg, load_tokenizer(tokenizer, trust_remote_code), output, seed, lineage,
                             kto_weights=kto_weights, pairs_only=pairs_only)
    print(summary(report), flush=True)
    for run, balance in (report.get("balance") or {}).items():
        if balance["warning"]:
            warn(balance["warning"], f"KTO run: {run}")
    gate(report, str(output))
    return report


def frames(data: str | Path, gated: bool = False):
    """The train and eval rows of a data folder; with `gated`, only if its validation report passed the gate."""
    import pandas as pd

    data = Path(data)
    if gated:
        from lexalign.core.io import read_json
        from lexalign.data.validation import gate

        gate(read_json(data / "report.json"), str(data))
    frames = pd.read_parquet(data / "train.parquet"), pd.read_parquet(data / "eval.parquet")
    chat = data_is_chat(data)
    for frame in frames:
        frame.attrs[CHAT_ATTR] = chat
    return frames


def data_is_chat(data: str | Path) -> bool:
    """Whether validation rendered a data folder's texts with the chat template (its report.json says)."""
    from lexalign.core.io import read_json

    report = Path(data) / "report.json"
    return bool(read_json(report).get(CHAT_ATTR, False)) if report.is_file() else False


def _job_inputs(model, data, output, checkpoint_dir, device, seed, resume, verbose, trust_remote_code,
                gated: bool = False) -> dict:
    """What every TrainingJob is built from (lexalign.train.job.TrainingJob's shared fields)."""
    train, evals = frames(data, gated)
    return {"model_path": Path(model), "train": train, "eval": evals, "output_dir": Path(output),
            "checkpoint_dir": Path(checkpoint_dir), "device": device, "seed": seed,
            "resume": Path(resume) if resume else None, "verbose": verbose, "trust_remote_code": trust_remote_code,
            "lineage_inputs": {"model": Path(model), "data": Path(data)}}


def finetune(*, model: str | Path, data: str | Path, output: str | Path, finetune: dict, checkpoint_dir: str | Path,
             device: str = "auto", seed: int = 42, trust_remote_code: bool = False, allow_pickle: bool = False,
             resume: str | None = None, verbose: bool = False, tracking: dict | None = None) -> Path:
    """Supervised fine-tuning of `model` on the prepared SFT `data` (the finetune section) into `output`.

    `tracking`: the experiment and run name the trackers of finetune.report_to log to (lexalign.train.tracking)."""
    from lexalign.train.finetune import FinetuneJob

    job = FinetuneJob(cfg=FinetuneConfig.from_dict(finetune), allow_pickle=allow_pickle, tracking=tracking,
                      **_job_inputs(model, data, output, checkpoint_dir, device, seed, resume, verbose,
                                    trust_remote_code))
    return job.run()


def reference(*, model: str | Path, data: str | Path, output: str | Path, setting: dict | None = None,
              device: str = "auto", trust_remote_code: bool = False, cache_dir: str | Path | None = None,
              tokenizer: str | None = None, reuse: bool = False) -> dict | None:
    """The reference model's log-probs of every validated train and eval response, once, into `output` (parquet).

    `setting`: layout (pairs, unpaired or k<K>), max_length, truncation_mode and load_in_4bit (from the file's
    name). `reuse` (`lexalign align`, which has no Snakemake to decide): keep a file already computed for exactly
    these inputs, and return None. Launched in several processes (scale.reference), each scores its share and the
    main process writes the file and returns the summary (lexalign.core.shares); the others return None."""
    from lexalign.core.shares import session
    from lexalign.data.validation import is_unpaired, needs_pairs_error
    from lexalign.methods import METHODS, Layout, parse_layout
    from lexalign.models.loading import resolve_device
    from lexalign.reference.scoring import compute_reference, is_current

    setting = {"layout": Layout.PAIRS.value, "max_length": 512, "truncation_mode": "keep_start",
               "load_in_4bit": False, **(setting or {})}
    layout = setting["layout"]
    kind = parse_layout(layout)[0]
    train, evals = frames(data, gated=True)
    if kind is not Layout.UNPAIRED and is_unpaired(train):  # before any model loads
        readers = " or ".join(m.name for m in METHODS.values() if m.layout is kind and m.needs_reference)
        raise needs_pairs_error(f'The reference step\'s layout "{layout}" (alignment.method {readers})', str(data))
    if reuse and is_current(output, model, tokenizer or model, train, evals, setting, resolve_device(device)):
        print(f"Reference log-probs up to date: {output}", flush=True)
        return None
    with session(output) as shard:
        summary = compute_reference(model, train, evals, output, layout=layout, max_length=setting["max_length"],
                                    truncation_mode=setting["truncation_mode"], device=resolve_device(device),
                                    load_in_4bit=setting["load_in_4bit"], trust_remote_code=trust_remote_code,
                                    tokenizer_path=tokenizer, cache_dir=cache_dir, shard=shard)
    if summary is None:
        return None  # not the main process: it writes the file and says so
    cached = f", tokens from the cache ({', '.join(summary['token_cache'])})" if summary["token_cache"] else ""
    spread = f" over {summary['processes']} processes" if summary["processes"] > 1 else ""
    print(f"Reference log-probs ({layout}): {summary['train_groups']} train + {summary['eval_groups']} eval groups, "
          f"{summary['sequences']} sequences in {summary['forward_seconds']:.1f} s{spread} "
          f"(tokenized in {summary['tokenize_seconds']:.1f} s{cached}) → {output}", flush=True)
    return summary


def align(*, model: str | Path, data: str | Path, output: str | Path, alignment: dict, checkpoint_dir: str | Path,
          reference: str | Path | None = None, device: str = "auto", seed: int = 42, trust_remote_code: bool = False,
          tokenizer: str | None = None, resume: str | None = None, verbose: bool = False,
          resume_command: str | None = None, tracking: dict | None = None,
          reference_model: str | Path | list | None = None, selection: str | Path | list | None = None) -> Path:
    """Align `model` (the SFT model, or the starting model with finetune.method none) on validated `data` (the
    alignment section) into `output`; with `reference` (the reference step's file; from the rule a one-element
    list, empty for the reference-free ORPO, SimPO and CPO) no reference pass runs in training. `tracking`: the
    experiment and run name the trackers of alignment.report_to log to. `reference_model`: the model `reference`
    was computed from, when not `model` (an online round held to the SFT model); its key is checked against it.
    `selection`: an online round's selection (JSON Lines with the sampled ids): without a reference file the
    trainer reads those ids (the reference file already holds them)."""
    from lexalign.train.align import AlignJob
    from lexalign.train.trainer_data import read_selection

    reference, reference_model, selection = _one(reference), _one(reference_model), _one(selection)
    job = AlignJob(cfg=AlignConfig.from_dict(alignment), tokenizer_path=Path(tokenizer) if tokenizer else None,
                   reference_path=Path(reference) if reference else None, tracking=tracking,
                   reference_model_path=Path(reference_model) if reference_model else None,
                   sampled=read_selection(selection) if selection and not reference else None,
                   **_job_inputs(model, data, output, checkpoint_dir, device, seed, resume, verbose,
                                 trust_remote_code, gated=True))
    if resume_command:
        job.resume_command = resume_command
    return job.run()


def _one(value: str | Path | list | None) -> str | Path | None:
    """An optional input given by the rule as a list of zero or one path (or by the CLI as a path)."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value or None


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
    from lexalign.evaluation.figures import evaluate as _evaluate
    from lexalign.evaluation.figures import summary
    from lexalign.models.loading import resolve_device

    ranked, reward_model = _one(ranked), _one(reward_model)
    _, evals = frames(data)
    ranked_eval = frames(ranked)[1] if ranked else None
    with session(output) as shard:
        result = _evaluate(Path(aligned), Path(reference), evals, EvaluateConfig.from_dict(evaluate), beta, seed,
                           ranked_eval, Path(reward_model) if reward_model else None, resolve_device(device), shard)
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

    sft = _one(sft)
    result = run_harness(Path(model), lm_eval, resolve_device(device), seed)
    if sft:
        result["lm_eval"] = compare(read_json(sft)["results"], result["results"])
    write_json(output, result)
    print(summary(result), flush=True)
    return result


def report(*, evals: list[str], models: list[str], validated: str | Path, tokenizer: str | Path, page: str | Path,
           plots: str | Path, runs: list[str], lm_evals: list[str] | None = None,
           online: list[str] | None = None) -> Path:
    """The HTML report comparing every run (lists are in the order of `runs`; `lm_evals` empty when no lm-eval
    tasks are configured; `online`: each online round's eval.json, in round order, empty without rounds)."""
    from lexalign.evaluation.report import build_report

    benchmarks = dict(zip(runs, map(Path, lm_evals), strict=True)) if lm_evals else {}
    out = build_report(dict(zip(runs, map(Path, evals), strict=True)), dict(zip(runs, map(Path, models), strict=True)),
                       Path(validated), Path(tokenizer), Path(page), Path(plots), benchmarks,
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


STEPS = {step.__name__: step for step in (download, prepare_sft, validate, finetune, reference, align, evaluate,
                                          lm_eval, report, publish)}
"""Every step, by the name `run` and the launcher know it."""


def run(step: str, **arguments):
    """Run a step with its arguments by name, after checking the names against the step's contract."""
    if step not in STEPS:
        raise LexAlignError(f'Unknown step "{step}"', f"Steps: {', '.join(STEPS)}")
    parameters = inspect.signature(STEPS[step]).parameters
    unknown = sorted(set(arguments) - set(parameters))
    missing = sorted(name for name, p in parameters.items() if p.default is p.empty and name not in arguments)
    if unknown or missing:
        raise LexAlignError(f"The {step} step was given the wrong arguments",
                            *([f"Unknown: {', '.join(unknown)}"] if unknown else []),
                            *([f"Missing: {', '.join(missing)}"] if missing else []),
                            f"It takes: {', '.join(parameters)}",
                            hint="Name the rule's input, output and params as the step function's arguments "
                                 "(lexalign/steps/training.py)")
    return STEPS[step](**arguments)


# --- on-policy alignment in rounds (rules/online.smk; the bodies are in lexalign.steps.rounds) ---------------


def online_prompts(*, output: str | Path, prompts: dict, seed: int = 42, data: str | Path | list | None = None
                   ) -> dict:
    """Every prompt of the `online.prompts` source, distinct and in one seeded order, into `output` (json);
    `data`: the validated preference data (prompts from: preference_data; a one-element list from the rule)."""
    from lexalign.steps.rounds import write_prompts

    return write_prompts(output, prompts, seed, _one(data))


def online_generate(*, model: str | Path, prompts: str | Path, output: str | Path, number: int, sampling: dict,
                    device: str = "auto", throughput: str | Path | None = None) -> dict | None:
    """Round `number`'s K completions per prompt from `model` (the previous round's, or SFT), as sampled ids;
    `throughput` (json, beside the rule's benchmark): its generation tokens per second. Launched in several
    processes (scale.generate), each samples its share of the shards and the main process joins them, writes the
    outputs and returns the report (lexalign.core.shares); the others return None."""
    from lexalign.core.shares import session
    from lexalign.steps.rounds import generate_round

    with session(output) as shard:
        return generate_round(model, prompts, output, number, sampling, device, shard, throughput)


def online_score(*, generations: str | Path, output: str | Path, judge: str, cache: str | Path,
                 reward_model: str | Path | list | None = None, llm_judge: dict | None = None,
                 device: str = "auto") -> dict | None:
    """The judge's score of every completion of a round (each asked once: `cache`). Launched in several processes
    (scale.score; judge reward_model), each scores its share of the batches and the main process writes the
    output and returns the counts (lexalign.core.shares); the others return None."""
    from lexalign.core.shares import session
    from lexalign.steps.rounds import score_round

    with session(output) as shard:
        return score_round(generations, output, judge, cache, _one(reward_model), llm_judge, device, shard)


def online_select(*, generations: str | Path, scores: str | Path, output: str | Path, report: str | Path,
                  select: dict) -> dict:
    """The round's training rows (JSON Lines, with the sampled ids) and its counts (`report`)."""
    from lexalign.steps.rounds import select_round

    return select_round(generations, scores, output, report, select)


def online_reference(*, model: str | Path, data: str | Path, selection: str | Path, output: str | Path,
                     setting: dict, device: str = "auto", trust_remote_code: bool = False) -> dict | None:
    """The reference log-probs of a round's validated data, of the ids that were sampled (never re-encoded).
    Launched in several processes (scale.reference, as the offline reference step), each scores its share and
    the main process writes the file and returns the summary; the others return None."""
    from lexalign.core.shares import session
    from lexalign.models.loading import resolve_device
    from lexalign.reference.scoring import compute_reference
    from lexalign.steps.rounds import sampled_token_tables

    train, evals = frames(data, gated=True)
    tables = sampled_token_tables(train, evals, selection, setting["layout"])
    with session(output) as shard:
        summary = compute_reference(model, train, evals, output, layout=setting["layout"],
                                    max_length=setting["max_length"], truncation_mode=setting["truncation_mode"],
                                    device=resolve_device(device), load_in_4bit=setting["load_in_4bit"],
                                    trust_remote_code=trust_remote_code, token_tables=tables, shard=shard)
    if summary is None:
        return None  # not the main process: it writes the file and says so
    spread = f" over {summary['processes']} processes" if summary["processes"] > 1 else ""
    print(f"Reference log-probs of the sampled ids: {summary['train_groups']} train + {summary['eval_groups']} eval "
          f"groups{spread} → {output}", flush=True)
    return summary


def online_evaluate(*, model: str | Path, sft: str | Path, reference: str | Path, prompts: str | Path,
                    output: str | Path, number: int, evaluate: dict, held_out: dict, reference_name: str,
                    seed: int = 42, data: str | Path | list | None = None,
                    reward_model: str | Path | list | None = None, device: str = "auto") -> dict:
    """Round `number`'s model against the SFT model on held-out prompts (the online judge's win rate with its
    interval, judged means, lengths) and its KL to the round's reference, into `output` (json)."""
    from lexalign.steps.rounds import evaluate_round

    return evaluate_round(model, sft, reference, prompts, output, number, evaluate, held_out, reference_name, seed,
                          _one(data), _one(reward_model), device)


def online_final(*, model: str | Path, rounds: list[str], output: str | Path) -> dict:
    """The last round's model into `output`, with lineage naming every round."""
    from lexalign.steps.rounds import finish

    return finish(model, rounds, output)


STEPS.update({step.__name__: step for step in (online_prompts, online_generate, online_score, online_select,
                                               online_reference, online_evaluate, online_final)})
