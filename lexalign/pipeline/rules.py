"""From a Snakemake rule to its step: `scripts/step.py` calls `run_rule(snakemake)`.

The rule's named inputs (but `code`), outputs and params are passed, by name and
unchanged, to the step function of `lexalign.steps.training` that `STEP_OF_RULE` names:
that function's signature is the rule's whole contract. Here, and only here, a
rule's output goes to its `log:` file, every step but download, publish and lm-eval (whose
tasks fetch their datasets) runs with HF_HUB_OFFLINE=1, a training step whose resources ask for
several processes, or nodes, is handed to `accelerate launch` (`lexalign.pipeline.launch`), and a LexAlignError becomes
a message (in the log and on the terminal) and exit status 1.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

from lexalign.core.errors import LexAlignError

STEP_OF_RULE = {
    "download_model": "download",
    "download_data": "download",
    "prepare_sft_data": "prepare_sft",
    "validate_preferences": "validate",
    "validate_groups": "validate",
    "finetune": "finetune",
    "reference": "reference",
    "align": "align",
    "align_run": "align",
    "evaluate": "evaluate",
    "evaluate_run": "evaluate",
    "download_reward_model": "download",
    "lm_eval_sft": "lm_eval",
    "lm_eval": "lm_eval",
    "lm_eval_run": "lm_eval",
    "report": "report",
    "publish": "publish",
    "online_prompts": "online_prompts",
    "online_generate": "online_generate",
    "online_score": "online_score",
    "online_select": "online_select",
    "online_validate": "validate",
    "online_reference": "online_reference",
    "online_align": "align",
    "online_evaluate": "online_evaluate",
    "online_final": "online_final",
}
"""Which step function of lexalign.steps.training each rule runs (sweep runs and variants share their step)."""
ONLINE_STEPS = ("download", "publish", "lm_eval")
"""Steps that may reach the Hub: the downloads, publishing, and lm-eval (its tasks' datasets; cached after
the first run, HF_HUB_OFFLINE=1 in the environment keeps it offline)."""
CODE_INPUT = "code"
"""The named input that lists the step's source files: a trigger for Snakemake, not an argument."""


def _value(value):
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value)


def rule_arguments(smk) -> dict:
    """The step's arguments: the rule's named inputs (but `code`), named outputs and params."""
    arguments = {name: _value(value) for name, value in smk.input.items() if name != CODE_INPUT}
    arguments.update((name, _value(value)) for name, value in smk.output.items())
    arguments.update(smk.params.items())
    return arguments


SCRIPT = "scripts/step.py"
"""Every rule's script (relative to the workflow's root)."""


def rule_sources(rule: str) -> list[Path]:
    """The files a rule runs, its `code` input: its step's sources (lexalign.pipeline.code_inputs) and the rule's
    script. The script is among them by content: Snakemake's own `code` trigger would compare its modification time,
    which every reinstall of the package renews."""
    return list(_step_files(step_of(rule)))


def _step_files(step: str) -> tuple[Path, ...]:
    from lexalign.pipeline.workflow_files import workflow_root

    return (*_step_sources()[step], workflow_root() / SCRIPT)


@functools.cache  # a plan asks for each of its ~25 rules' files: the package's imports are read once
def _step_sources() -> dict[str, tuple[Path, ...]]:
    """Every step's source files (lexalign.pipeline.code_inputs), kept between plans while the package is unchanged
    (lexalign.pipeline.plan_cache: reading the imports of every step costs more than the rest of the workflow's
    parsing)."""
    from lexalign.pipeline.plan_cache import PACKAGE_DIR, remembered

    def derive():
        from lexalign.pipeline.code_inputs import ROOT, step_sources

        return {step: [str(path.relative_to(ROOT)) for path in step_sources(step)]
                for step in sorted(set(STEP_OF_RULE.values()))}

    relative = remembered("code-inputs", None, derive)
    return {step: tuple(PACKAGE_DIR / path for path in paths) for step, paths in relative.items()}


def step_of(rule: str) -> str:
    if rule not in STEP_OF_RULE:
        raise LexAlignError(f'Rule "{rule}" runs no known step',
                            hint="Add it to STEP_OF_RULE in lexalign/pipeline/rules.py")
    return STEP_OF_RULE[rule]


def run_rule(smk) -> None:
    """Run the step of the rule `smk.rule` (Snakemake's `snakemake` object) with the rule's arguments."""
    from lexalign.pipeline import launch
    from lexalign.steps import checked

    step = step_of(smk.rule)
    if step not in ONLINE_STEPS:
        os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = Path(smk.log[0]) if smk.log else None
    terminal = sys.__stderr__
    handle = log.open("w", encoding="utf-8") if log else None
    try:
        with contextlib.ExitStack() as stack:
            if handle:
                stack.enter_context(contextlib.redirect_stdout(handle))
                stack.enter_context(contextlib.redirect_stderr(handle))
            try:
                arguments = rule_arguments(smk)
                processes = launch.processes_for(step, getattr(smk, "resources", None))
                nodes = launch.nodes_for(step, getattr(smk, "resources", None))
                if nodes > 1:
                    launch.run_on_nodes(step, arguments, nodes, processes, smk.resources,
                                        getattr(smk, "threads", None), log.parent if log else None)
                elif processes > 1:
                    launch.run_in_processes(step, arguments, processes, smk.resources, getattr(smk, "threads", None),
                                            log.parent if log else None)
                else:
                    checked(step, arguments)(**arguments)
            except LexAlignError as err:
                print(err.render(), file=sys.stderr, flush=True)
                if handle:
                    print(err.render(), file=terminal, flush=True)
                sys.exit(1)
    finally:
        if handle:
            handle.close()
