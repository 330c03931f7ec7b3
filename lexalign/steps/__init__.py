"""One function per pipeline step: the whole contract of each Snakemake rule, in one place.

A rule's named `input:`, `output:` and `params:` are its step function's keyword arguments, by the same names:
`lexalign.pipeline.rules.run_rule` checks them (`step_function`) and passes them unchanged; the CLI calls the same
functions. Each step takes plain paths and validated config sections, so a rule's params (what Snakemake watches
for changes) are exactly what its step reads, and does its work through the domain packages: one layer between a
rule and the code that does the work.

The steps live in the modules of their phase (`PHASES`). This module imports none of them (standard library and
the errors only), so a step's code inputs (lexalign.pipeline.code_inputs) hold its own phase's module alone.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from lexalign.core.errors import LexAlignError

PHASES = {
    "inputs": ("download", "prepare_sft", "validate"),
    "training": ("finetune", "reference", "align"),
    "results": ("evaluate", "lm_eval", "report", "publish"),
    "rounds": ("online_prompts", "online_generate", "online_score", "online_select", "online_reference",
               "online_evaluate", "online_final"),
}
"""Each module of this package and its steps: models and data in place; training; what a run gave (figures,
benchmarks, the report, the published model); the on-policy rounds."""
STEPS = {step: phase for phase, steps in PHASES.items() for step in steps}
"""Every step, by the name the rules (lexalign.pipeline.rules.STEP_OF_RULE) and the launcher know it → its phase."""


def step_module(step: str) -> str:
    """The module that defines `step`."""
    if step not in STEPS:
        raise LexAlignError(f'Unknown step "{step}"', f"Steps: {', '.join(STEPS)}")
    return f"{__name__}.{STEPS[step]}"


def step_function(step: str):
    """The function of `step`."""
    return getattr(importlib.import_module(step_module(step)), step)


def checked(step: str, arguments: dict):
    """The function of `step`, once `arguments` are exactly its keyword arguments (a rule's named inputs, outputs
    and params, or a launched process's spec)."""
    function = step_function(step)
    parameters = inspect.signature(function).parameters
    unknown = sorted(set(arguments) - set(parameters))
    missing = sorted(name for name, p in parameters.items() if p.default is p.empty and name not in arguments)
    if unknown or missing:
        raise LexAlignError(f"The {step} step was given the wrong arguments",
                            *([f"Unknown: {', '.join(unknown)}"] if unknown else []),
                            *([f"Missing: {', '.join(missing)}"] if missing else []),
                            f"It takes: {', '.join(parameters)}",
                            hint="Name the rule's input, output and params as the step function's arguments "
                                 f"({step_module(step).replace('.', '/')}.py)")
    return function


def run(step: str, **arguments):
    """Run a step with its arguments by name, after checking them against the step's contract."""
    return checked(step, arguments)(**arguments)


def one(value: str | Path | list | None) -> str | Path | None:
    """An optional input given by a rule as a list of zero or one path (or by the CLI as a path)."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value or None
