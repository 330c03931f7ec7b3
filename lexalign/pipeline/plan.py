"""The config as the workflow plans with it: checked, completed, and kept between plans.

rules/common.smk calls `checked_config` as Snakemake reads the workflow (every run, dry run and cluster job). It
is a function of the config as given and of this package only, so its result is kept (lexalign.pipeline.plan_cache): a
plan with nothing new imports no schema validator. Living in the package, not in the rules, its code is part of
the cache's key: editing it recomputes.
"""

from __future__ import annotations

from pathlib import Path

from lexalign.core.errors import LexAlignError
from lexalign.core.paths import require_data, require_model
from lexalign.pipeline.plan_cache import remembered

ONLINE_PLACEHOLDER = {"rounds": 1, "judge": "demo", "alignment": {"method": "dpo"}, "sampling": {"max_new_tokens": 1}}
"""The online settings the online rules read without an online section (they are never planned then)."""


def checked_config(given: dict) -> dict:
    """For the pipeline config `given` (kept between plans): `config` checked and completed, the sweep `runs`
    (name → alignment section), the `online` settings (None without the section) or the `online_placeholder`,
    each download's `sources` (section → what it fetches) and each training run's `tracking` (run → where it
    reports: lexalign.train.tracking.pipeline_tracking)."""
    return remembered("config", given, lambda: _check(given))


def _check(given: dict) -> dict:
    """The schema (lexalign/config/config.schema.yaml) fills defaults, turns `1e-5` strings into numbers and
    names the key, the value found and what is expected on an error, as the CLI does; then each section,
    each sweep run and the online section are checked in full."""
    from lexalign.config.loader import validate_config
    from lexalign.config.online import settings
    from lexalign.config.sections import AlignConfig, EvaluateConfig, FinetuneConfig, run_alignment

    config = validate_config(given, "pipeline", source="the pipeline config")
    FinetuneConfig.from_dict(config["finetune"])
    AlignConfig.from_dict(config["alignment"])
    EvaluateConfig.from_dict(config["evaluate"])
    # Each sweep run: the alignment section with the run's overrides (a run that changes the method leaves the
    # base method's own keys behind: lexalign.config.sections.run_alignment), checked in full; a key the run's
    # method does not use is named in a warning and set back to its default, as under alignment.
    runs = {}
    for name, overrides in config["runs"].items():
        try:
            runs[name] = run_alignment(config["alignment"], overrides, name)
            AlignConfig.from_dict(runs[name])
        except LexAlignError as err:
            err.details = [*err.details, f"In the sweep run runs.{name}"]
            raise
    # The online section (every round's alignment checked); without one, placeholder settings.
    online = settings(config)
    return {"config": config, "runs": runs, "online": online,
            "online_placeholder": None if online else settings({**config, "online": ONLINE_PLACEHOLDER}),
            "sources": _sources(config), "tracking": _tracking(config, runs, online)}


def _sources(config: dict) -> dict:
    """What each download fetches (lexalign.config.loader.download_source: its source keys only, so changing a
    field name or a split downloads nothing again)."""
    from lexalign.config.loader import download_source

    sections = {name: config[name] for name in ("model", "sft_data", "preference_data")}
    return {name: download_source(section) for name, section in
            {**sections, "reward_model": config["evaluate"]["reward_model"]}.items()}


def _tracking(config: dict, runs: dict, online: dict | None) -> dict:
    """Each training run's trackers: SFT (`sft`), the primary alignment (`aligned`), each sweep run, each online
    round (`online-round-<r>`)."""
    from lexalign.config.online import round_alignment
    from lexalign.train.tracking import pipeline_tracking

    sections = {"sft": config["finetune"], "aligned": config["alignment"], **runs}
    if online:
        sections.update((f"online-round-{r}", round_alignment(online, r)) for r in range(1, online["rounds"] + 1))
    return {run: pipeline_tracking(config, section, run) for run, section in sections.items()}


def check_pipeline_paths(config: dict) -> None:
    """Every local path of the pipeline config, before the DAG is built (a missing one stops it here)."""
    produced = "Fix model.path in config/config.yaml, or give model.repo_id to download it from the Hub"
    model = config["model"]
    if model.get("source") == "local" and (model.get("gguf_file") or str(model["path"]).lower().endswith(".gguf")):
        from importlib.metadata import version

        from lexalign.hub import gguf  # the file's header alone (milliseconds); what transformers reads is kept

        support = remembered("gguf_support", version("transformers"), gguf.transformers_support)
        gguf.check_gguf_source(model["path"], model.get("gguf_file"), "model.path", support)
    elif model.get("source") == "local":
        require_model(Path(model["path"]).expanduser(), produced, key="model.path")
    evaluate = config.get("evaluate") or {}
    reward = evaluate.get("reward_model") or {}
    if evaluate.get("judge") == "reward_model" and reward.get("path") and not reward.get("repo_id"):
        require_model(Path(reward["path"]).expanduser(), "Fix evaluate.reward_model.path in config/config.yaml",
                      key="evaluate.reward_model.path")
    sections = ["preference_data"] + (["sft_data"] if config["finetune"]["method"] != "none" else [])
    for name in sections:
        section = config.get(name) or {}
        if section.get("source") == "local":
            path = require_data(section.get("path"), f"{name}.path", f"Fix {name}.path in config/config.yaml")
            if section.get("data_dir"):
                from lexalign.data.splits import resolve_data_dir

                resolve_data_dir(path, section["data_dir"])
    prompts = (config.get("online") or {}).get("prompts") or {}
    if prompts.get("from") == "path" and prompts.get("path"):  # online.prompts.path: a file LexAlign reads
        from lexalign.generation.prompts import check_prompt_file

        check_prompt_file(prompts["path"])


def check_machine(config: dict, executor: str | None = None) -> None:
    """What this machine must have for the config, checked on every plan, the dry run included (never kept: the
    machine may change): vLLM and a CUDA GPU for online.sampling.engine vllm. The GPU is needed where the jobs
    run: here, unless they go to a cluster (`executor` SLURM's; before the executor is known, srun on PATH)."""
    import importlib.util
    import shutil

    from lexalign.pipeline.scale import SLURM_EXECUTORS

    engine = ((config.get("online") or {}).get("sampling") or {}).get("engine", "hf")
    if engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise LexAlignError("online.sampling.engine is vllm, but vLLM is not installed here",
                            hint='pip install "lexalign[vllm]" on a machine with a CUDA GPU, or set '
                                 "online.sampling.engine: hf")
    if config.get("device") == "cpu":
        raise LexAlignError('online.sampling.engine is vllm, which needs a CUDA GPU, and device is "cpu"',
                            hint="Set online.sampling.engine: hf, or device: auto on a machine with a CUDA GPU")
    if executor in SLURM_EXECUTORS or (executor in (None, "dryrun") and shutil.which("srun")):
        return  # the jobs run on the cluster's GPU nodes; the step checks again there before any work
    import torch

    if not torch.cuda.is_available():
        raise LexAlignError("online.sampling.engine is vllm, which needs a CUDA GPU, and this machine has none",
                            hint="Set online.sampling.engine: hf (transformers' generate runs everywhere), or run "
                                 "where there is a CUDA GPU (or submit the jobs with the SLURM profile)")


def check_judges(config: dict) -> None:
    """The judges' files and instructions, on every plan (never kept: the files may change): a reward function
    of the user's names a Python file that is there; every IFEval instruction the prompts ask for has a checker
    that runs here (two need NLTK's punkt_tab data: evaluate.ifeval.nltk_data)."""
    from lexalign.config.sections import judge_name

    online = config.get("online") or {}
    evaluate = config.get("evaluate") or {}
    judges = [("evaluate.judge", evaluate.get("judge"))] + ([("online.judge", online.get("judge"))] if online else [])
    for key, judge in judges:
        if isinstance(judge, dict):
            from lexalign.generation.reward_functions import parse_reference

            parse_reference(judge["python"], key=f"{key}.python")
    if "ifeval" not in [judge_name(judge) for _, judge in judges if judge is not None]:
        return
    from lexalign.generation import ifeval

    nltk_data = (evaluate.get("ifeval") or {}).get("nltk_data")
    asked: dict[str, str] = {}  # instruction id → where it is asked
    prompts = online.get("prompts") or {}
    if online and judge_name(online.get("judge")) == "ifeval":
        if prompts.get("from") == "instructions":
            from lexalign.generation.instruction_set import INSTRUCTIONS

            ids = (prompts.get("instructions") or {}).get("types") or list(INSTRUCTIONS)
            asked.update((i, "online.prompts.instructions.types") for i in ids)
        elif prompts.get("from") == "path" and prompts.get("path"):
            asked.update(_asked_in(prompts["path"], prompts.get("prompt_field", "prompt"), "online.prompts.path"))
    file = (evaluate.get("ifeval") or {}).get("prompts")
    offline = not online or online.get("offline", True)  # the evaluate step runs (each round's reads prompts.json)
    if judge_name(evaluate.get("judge")) == "ifeval" and (offline or file):
        if not file:
            raise LexAlignError('evaluate.judge is "ifeval", which scores prompts in IFEval\'s format, and '
                                "evaluate.ifeval.prompts names none",
                                hint="Set evaluate.ifeval.prompts to a file of IFEval rows (prompt, "
                                     "instruction_id_list, kwargs)")
        asked.update(_asked_in(file, "prompt", "evaluate.ifeval.prompts"))
    refused = {i: reason for i, reason in ifeval.runnable(asked, nltk_data).items() if reason}
    if refused:
        raise LexAlignError("The judge ifeval cannot check every instruction the prompts ask for",
                            *(f"{i} ({asked[i]}): {reason}" for i, reason in refused.items()),
                            hint="Drop those instructions, or give evaluate.ifeval.nltk_data (lexalign fetch punkt "
                                 "writes NLTK's punkt_tab data)")


def _asked_in(path: str, field: str, key: str) -> dict[str, str]:
    """Every IFEval instruction id a prompt file's rows ask for → where (the rows are read as the step reads them)."""
    from lexalign.generation.prompts import check_prompt_file, read_prompt_file

    check_prompt_file(path, key)
    asked = {}
    for row in read_prompt_file(path, field, key).rows:
        ids = row.get("instruction_id_list")
        if not isinstance(ids, list) or not ids:
            raise LexAlignError(f"The judge ifeval reads prompts in IFEval's format, and a row of \"{path}\" ({key}) "
                                "has no instruction_id_list", f"Row: {str(row)[:160]}",
                                hint="Give every row prompt, instruction_id_list and kwargs (IFEval's format)")
        asked.update((i, key) for i in ids)
    return asked
