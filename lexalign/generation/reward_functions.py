"""A user's own reward function as a judge, written once for LexAlign and for TRL alike.

A reward function is what TRL's GRPOTrainer takes in `reward_funcs`, and it is called the way that trainer calls one
(trl/trainer/grpo_trainer.py, `_calculate_rewards`):

    fn(prompts=[...], completions=[...], completion_ids=..., <each other field of the rows>=[...],
       trainer_state=..., log_extra=..., log_metric=...) -> one float (or None) per completion

every keyword a list with one value per completion, the rows' own `prompt`, `completion` and `completion_ids`
left out. So a function written for GRPO judges LexAlign's rounds unchanged (`def reward(prompts, completions,
**kwargs)`), and one written here trains with GRPO. LexAlign passes plain-text prompts and completions; outside a
trainer `trainer_state` is None and `log_extra` / `log_metric` keep nothing.

The config names it `judge.python: "path/to/rewards.py:function"`; the file is imported by path, afresh on every
`load` (an edited file is read again), and never stays on `sys.path`. Whatever the function does wrong (raises,
returns too few values, returns text) comes back as a LexAlignError naming the function, with the file and line
where it raised: a message, never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import inspect
import itertools
import linecache
import math
import numbers
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lexalign.core.errors import LexAlignError

KEY = "judge.python"
SIGNATURE_HINT = ("A reward function is called as TRL's GRPOTrainer calls one: fn(prompts, completions, **kwargs), "
                  "each keyword a list with one value per completion, and returns one number (or None) a completion")
LEFT_OUT = frozenset({"prompt", "completion", "completion_ids"})
"""Row fields TRL does not pass on as keywords (it passes the batch's prompts and completions itself)."""
PASSED_BY_TRL = frozenset({"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                           "environments"})
"""Keywords TRL sets itself; a row field of the same name is not passed on."""
_LOADS = itertools.count()


def parse_reference(reference: str, base_dir: str | Path | None = None, key: str = KEY) -> tuple[Path, str]:
    """(the file, the function's name) of "path/to/rewards.py:function", the file relative to `base_dir`; checked
    before anything is imported, so a typo in the config is reported at plan time."""
    example = f'{key}: "rewards.py:reward"'
    if not isinstance(reference, str) or ":" not in reference:
        raise LexAlignError(f'{key} must name a Python file and a function in it, "path/to/file.py:function", '
                            f"not {reference!r}", hint=f"For example: {example}")
    file, _, name = reference.rpartition(":")
    file, name = file.strip(), name.strip()
    if not file or not name.isidentifier():
        raise LexAlignError(f'{key} must be "path/to/file.py:function": {reference!r} has '
                            + ("no file before the colon" if not file else f"{name!r} for a function name"),
                            hint=f"For example: {example}")
    path = Path(file).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.suffix != ".py":
        raise LexAlignError(f'{key} names "{file}", which is not a Python file (.py)', hint=f"For example: {example}")
    if not path.is_file():
        raise LexAlignError(f'{key} names "{path}", which does not exist' if not path.exists() else
                            f'{key} names "{path}", which is not a file',
                            *([f"Relative paths are read from {base_dir}"] if base_dir is not None else []),
                            hint=f"Write the function in a .py file and name it: {example}")
    return path, name


def _raised_at(err: BaseException, file: str | None) -> str:
    """Where `err` was raised: the innermost frame in the user's `file` (else the innermost of all), with its line."""
    frames = traceback.extract_tb(err.__traceback__)
    if isinstance(err, SyntaxError) and err.filename:
        frames.append(traceback.FrameSummary(err.filename, err.lineno or 0, "<module>"))
    mine = [f for f in frames if file and Path(f.filename) == Path(file)]
    frame = (mine or frames or [None])[-1]
    if frame is None:
        return ""
    linecache.checkcache(frame.filename)  # the file may have been edited since it was last read
    line = linecache.getline(frame.filename, frame.lineno or 0).strip()
    return f"at {frame.filename}:{frame.lineno}" + (f": {line}" if line else "")


def load(reference: str, base_dir: str | Path | None = None, key: str = KEY) -> Callable:
    """The function `reference` names, its file imported by path as a new module on every call (compiled from
    the file as it is now, no bytecode cache read or written), so an edited file gives the edited function. The
    file's folder is on `sys.path` while it is imported (it may import its neighbours), then taken off; a neighbour
    it imports is Python's to cache, read once a process."""
    path, name = parse_reference(reference, base_dir, key)
    path = path.resolve()
    module_name = f"lexalign_reward_{next(_LOADS)}_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    sys.modules[module_name] = module  # while it runs, and after: dataclasses and pickle look modules up there
    try:
        exec(compile(path.read_bytes(), str(path), "exec", dont_inherit=True), module.__dict__)
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise LexAlignError(f'Importing "{path}" ({key}) raised {type(err).__name__}: {err}',
                            _raised_at(err, str(path)), hint="Fix the file; it is imported before any completion is "
                                                             "judged") from None
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    fn = getattr(module, name, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items()
                         if callable(v) and getattr(v, "__module__", None) == module_name and not k.startswith("_"))
        raise LexAlignError(f'"{path}" ({key}) has no function {name!r}',
                            f"It defines: {', '.join(defined)}" if defined else "It defines no function",
                            hint=f'Name one of its functions after the colon: {key}: "{path.name}:<function>"')
    if not callable(fn):
        raise LexAlignError(f'{name!r} in "{path}" ({key}) is a {type(fn).__name__}, not a function',
                            hint=SIGNATURE_HINT)
    return fn


def _source_file(fn: Callable) -> str | None:
    """The file the function's code is in (a partial's function, a callable object's __call__)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(fn, "__code__", None) or getattr(inspect.getattr_static(type(fn), "__call__", None), "__code__",
                                                    None)
    return code.co_filename if code else None


def _label(fn: Callable, name: str | None) -> str:
    if name:
        return name
    file = _source_file(fn)
    base = fn
    while isinstance(base, functools.partial):
        base = base.func
    qualname = getattr(base, "__qualname__", None) or type(base).__name__
    return f"{Path(file).name}:{qualname}" if file else qualname


def row_fields(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """The keywords TRL makes of a batch's rows: each field of the first row but prompt, completion and
    completion_ids, as a list with one value a row."""
    if not rows:
        return {}
    return {k: [row.get(k) for row in rows] for k in rows[0] if k not in LEFT_OUT}


def _discard(*args, **kwargs) -> None:
    """log_extra / log_metric outside a trainer: there is no completions table or metric to add to."""


def _number(value: Any) -> float | None | str:
    """The reward as a float, None for none (None or NaN, as TRL reads None), or why it is no reward (a str)."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real) and getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()  # a 0-d array or tensor
    if not isinstance(value, numbers.Real):
        return f"{value!r} ({type(value).__name__}), not a number or None"[:160]
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value):
        return f"{value} is not a finite number"
    return value


def call(fn: Callable, prompts: Sequence[Any], completions: Sequence[Any], fields: Mapping[str, Sequence] | None = None,
         *, completion_ids: Sequence | None = None, name: str | None = None) -> list[float | None]:
    """The function's reward of each completion, called as TRL calls it (`fields`: the rows' other fields, a list
    with one value a completion; `row_fields` makes them), checked: one number or None a completion, NaN read as
    None. A function that raises, or returns anything else, stops with a LexAlignError that names it."""
    label = _label(fn, name)
    count = len(completions)
    if len(prompts) != count:
        raise LexAlignError(f"The reward function {label} was given {len(prompts)} prompts for {count} completions")
    keywords: dict[str, Any] = {}
    for key, values in (fields or {}).items():
        if key in LEFT_OUT or key in PASSED_BY_TRL:
            continue
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != count:
            raise LexAlignError(f"The field {key!r} passed to the reward function {label} must be a list of {count} "
                                f"values, one a completion")
        keywords[key] = list(values)
    keywords.update(trainer_state=None, log_extra=_discard, log_metric=_discard)
    try:
        result = fn(prompts=list(prompts), completions=list(completions), completion_ids=completion_ids, **keywords)
        if inspect.isawaitable(result):  # TRL awaits async reward functions
            result = asyncio.run(_awaited(result))
    except Exception as err:
        raise LexAlignError(f"The reward function {label} raised {type(err).__name__}: {err}"[:1000],
                            _raised_at(err, _source_file(fn)), hint=SIGNATURE_HINT) from None
    if isinstance(result, (str, bytes, Mapping)) or not hasattr(result, "__len__") \
            or not hasattr(result, "__iter__"):
        raise LexAlignError(f"The reward function {label} returned a {type(result).__name__}, not a list of "
                            f"{count} rewards", hint=SIGNATURE_HINT)
    values = list(result)
    if len(values) != count:
        raise LexAlignError(f"The reward function {label} returned {len(values)} rewards for {count} completions",
                            hint="Return exactly one reward (a number, or None for none) per completion, in order")
    rewards: list[float | None] = []
    for index, value in enumerate(values):
        reward = _number(value)
        if isinstance(reward, str):
            raise LexAlignError(f"The reward function {label} returned a reward that is no number for completion "
                                f"{index}: {reward}", hint=SIGNATURE_HINT)
        rewards.append(reward)
    return rewards


async def _awaited(awaitable):
    return await awaitable
