"""The training steps: finetune (SFT), reference (the reference model's log-probs, once) and align."""

from __future__ import annotations

from pathlib import Path

from lexalign.config.sections import AlignConfig, FinetuneConfig
from lexalign.steps import one


def finetune(*, model: str | Path, data: str | Path, output: str | Path, finetune: dict, checkpoint_dir: str | Path,
             device: str = "auto", seed: int = 42, trust_remote_code: bool = False, allow_pickle: bool = False,
             resume: str | None = None, verbose: bool = False, tracking: dict | None = None) -> Path:
    """Supervised fine-tuning of `model` on the prepared SFT `data` (the finetune section) into `output`.

    `tracking`: the experiment and run name the trackers of finetune.report_to log to (lexalign.train.tracking)."""
    from lexalign.train.finetune import FinetuneJob
    from lexalign.train.job import job_inputs

    job = FinetuneJob(cfg=FinetuneConfig.from_dict(finetune), allow_pickle=allow_pickle, tracking=tracking,
                      **job_inputs(model, data, output, checkpoint_dir, device, seed, resume, verbose,
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
    from lexalign.data.validated import is_unpaired, needs_pairs_error, read_validated
    from lexalign.methods import METHODS, Layout, parse_layout
    from lexalign.models.loading import resolve_device
    from lexalign.reference.scoring import compute_reference, is_current

    setting = {"layout": Layout.PAIRS.value, "max_length": 512, "truncation_mode": "keep_start",
               "load_in_4bit": False, "bf16": None, **(setting or {})}
    layout = setting["layout"]
    kind = parse_layout(layout)[0]
    train, evals = read_validated(data, gated=True)
    if kind is not Layout.UNPAIRED and is_unpaired(train):  # before any model loads
        readers = " or ".join(m.name for m in METHODS.values() if m.layout is kind and m.needs_reference)
        raise needs_pairs_error(f'The reference step\'s layout "{layout}" (alignment.method {readers})', str(data))
    if reuse and is_current(output, model, tokenizer or model, train, evals, setting, resolve_device(device)):
        print(f"Reference log-probs up to date: {output}", flush=True)
        return None
    with session(output) as share:
        summary = compute_reference(model, train, evals, output, layout=layout, max_length=setting["max_length"],
                                    truncation_mode=setting["truncation_mode"], device=resolve_device(device),
                                    load_in_4bit=setting["load_in_4bit"], trust_remote_code=trust_remote_code,
                                    tokenizer_path=tokenizer, cache_dir=cache_dir, share=share,
                                    bf16=setting["bf16"])
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
    from lexalign.train.job import job_inputs
    from lexalign.train.trainer_data import read_selection

    reference, reference_model, selection = one(reference), one(reference_model), one(selection)
    job = AlignJob(cfg=AlignConfig.from_dict(alignment), tokenizer_path=Path(tokenizer) if tokenizer else None,
                   reference_path=Path(reference) if reference else None, tracking=tracking,
                   reference_model_path=Path(reference_model) if reference_model else None,
                   sampled=read_selection(selection) if selection and not reference else None,
                   **job_inputs(model, data, output, checkpoint_dir, device, seed, resume, verbose,
                                 trust_remote_code, gated=True))
    if resume_command:
        job.resume_command = resume_command
    return job.run()

