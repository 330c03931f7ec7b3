"""A user's own reward function as a judge (lexalign.generation.reward_functions): named in the config as
"file.py:function", imported by path afresh, called exactly as TRL's GRPOTrainer calls reward functions, and every
way it can go wrong reported as a message that names it."""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest

from lexalign.core.errors import LexAlignError
from lexalign.generation import reward_functions as rf

ROWS = [{"prompt": "Greet Ann.", "completion": "ignored", "task": "greet", "weight": 1},
        {"prompt": "Greet Bob.", "completion": "ignored", "task": "greet", "weight": 2},
        {"prompt": "Add 2 and 2.", "completion": "ignored", "task": "math", "weight": 3}]
PROMPTS = [r["prompt"] for r in ROWS]
COMPLETIONS = ["Hello Ann!", "Go away.", "4"]

RECORDING = '''
SEEN = {}


def reward(prompts, completions, **kwargs):
    """TRL's own example shape: every keyword a list, one value a completion."""
    SEEN.clear()
    SEEN.update(kwargs, prompts=prompts, completions=completions)
    return [float(w) if c.startswith("Hello") else 0.0 for c, w in zip(completions, kwargs["weight"])]
'''


def write(folder: Path, text: str, name: str = "rewards.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def refused(call, *args, **kwargs) -> str:
    """The rendered message of the LexAlignError `call` raises."""
    with pytest.raises(LexAlignError) as err:
        call(*args, **kwargs)
    return err.value.render()


# --- naming it -----------------------------------------------------------------------------------------


def test_a_reference_that_names_no_python_function_is_refused_naming_the_key_and_the_file(tmp_path):
    write(tmp_path, RECORDING)
    (tmp_path / "rewards.txt").write_text("")
    (tmp_path / "folder.py").mkdir()
    assert rf.parse_reference("rewards.py:reward", tmp_path) == (tmp_path / "rewards.py", "reward")
    for reference, expected in [("rewards.py", "must name a Python file and a function"),
                                ("rewards.py:", "for a function name"),
                                (":reward", "no file before the colon"),
                                ("rewards.py:not-a-name", "'not-a-name' for a function name"),
                                ("rewards.txt:reward", '"rewards.txt", which is not a Python file'),
                                ("missing.py:reward", "missing.py\", which does not exist"),
                                ("folder.py:reward", "which is not a file")]:
        message = refused(rf.parse_reference, reference, tmp_path)
        assert "judge.python" in message and expected in message, (reference, message)
    assert f"Relative paths are read from {tmp_path}" in refused(rf.parse_reference, "missing.py:reward", tmp_path)


def test_a_function_missing_from_the_file_or_not_callable_is_refused_with_what_the_file_defines(tmp_path):
    write(tmp_path, RECORDING + "\nTHRESHOLD = 3\n\ndef length(prompts, completions, **kwargs):\n    return []\n")
    message = refused(rf.load, "rewards.py:rewrd", tmp_path)
    assert "has no function 'rewrd'" in message and "It defines: length, reward" in message
    assert str(tmp_path / "rewards.py") in message and "judge.python" in message
    assert "is a int, not a function" in refused(rf.load, "rewards.py:THRESHOLD", tmp_path)


def test_a_file_that_fails_to_import_is_reported_with_its_line_not_a_traceback(tmp_path):
    path = write(tmp_path, "import json\n\nLIMIT = json.loads('not json')\n")
    message = refused(rf.load, "rewards.py:reward", tmp_path)
    assert "raised JSONDecodeError" in message and f"at {path}:3: LIMIT = json.loads('not json')" in message
    assert "Traceback" not in message
    write(tmp_path, "def reward(prompts, completions, **kwargs)\n    return [1.0]\n", "broken.py")
    message = refused(rf.load, "broken.py:reward", tmp_path)
    assert "raised SyntaxError" in message and f"{tmp_path / 'broken.py'}:1" in message


def test_the_file_is_imported_afresh_on_every_load_and_leaves_sys_path_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as for most users (PYTHONDONTWRITEBYTECODE unset)
    write(tmp_path, "from reward_helper_for_tests import BONUS\n\ndef reward(prompts, completions, **kwargs):\n"
                    "    return [1.0 + BONUS for _ in completions]\n")
    write(tmp_path, "BONUS = 0.5\n", "reward_helper_for_tests.py")
    path_before = list(sys.path)
    first = rf.load("rewards.py:reward", tmp_path)  # its neighbour imports while it loads
    assert sys.path == path_before
    assert rf.call(first, PROMPTS, COMPLETIONS) == [1.5, 1.5, 1.5]
    # the same size, the same second: a bytecode cache keyed on (mtime, size) would hand back the old function
    write(tmp_path, "from reward_helper_for_tests import BONUS\n\ndef reward(prompts, completions, **kwargs):\n"
                    "    return [2.0 + BONUS for _ in completions]\n")
    second = rf.load("rewards.py:reward", tmp_path)
    assert rf.call(second, PROMPTS, COMPLETIONS) == [2.5, 2.5, 2.5]
    assert rf.call(first, PROMPTS, COMPLETIONS) == [1.5, 1.5, 1.5]  # a loaded function keeps its own code
    assert first.__module__ != second.__module__
    assert not list(tmp_path.glob("__pycache__/rewards.*"))  # no bytecode written beside the user's file


# --- calling it as TRL does ---------------------------------------------------------------------------


def test_a_trl_style_function_gets_the_rows_other_fields_as_lists(tmp_path):
    write(tmp_path, RECORDING)
    reward = rf.load("rewards.py:reward", tmp_path)
    fields = rf.row_fields(ROWS)
    assert fields == {"task": ["greet", "greet", "math"], "weight": [1, 2, 3]}  # prompt and completion left out
    assert rf.call(reward, PROMPTS, COMPLETIONS, fields) == [1.0, 0.0, 0.0]
    seen = sys.modules[reward.__module__].SEEN
    assert seen["prompts"] == PROMPTS and seen["completions"] == COMPLETIONS
    assert seen["task"] == ["greet", "greet", "math"] and seen["weight"] == [1, 2, 3]
    assert seen["completion_ids"] is None and seen["trainer_state"] is None
    assert seen["log_extra"]("column", [1, 2, 3]) is None and seen["log_metric"]("m", 1.0) is None
    assert set(seen) == {"prompts", "completions", "completion_ids", "task", "weight", "trainer_state", "log_extra",
                         "log_metric"}
    rf.call(reward, PROMPTS, COMPLETIONS, fields, completion_ids=[[1], [2], [3]])
    assert seen["completion_ids"] == [[1], [2], [3]]


def test_the_keywords_are_the_ones_trls_grpo_trainer_passes(tmp_path):
    """TRL's own _calculate_rewards, run on a stand-in for the trainer, calls the same function with the same
    keywords and gets the same rewards."""
    torch = pytest.importorskip("torch")
    from trl.trainer.grpo_trainer import GRPOTrainer

    write(tmp_path, RECORDING)
    reward = rf.load("rewards.py:reward", tmp_path)
    seen = sys.modules[reward.__module__].SEEN
    trainer = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        reward_funcs=[reward], reward_processing_classes=[None], reward_func_names=["reward"],
        state=types.SimpleNamespace(global_step=0), args=types.SimpleNamespace(report_to=[]),
        _log_completion_extra=lambda column, values: None, _log_metric=lambda name, value: None, environments=None)
    by_trl = GRPOTrainer._calculate_rewards(trainer, ROWS, PROMPTS, COMPLETIONS, [[1], [2], [3]])
    trl_seen = dict(seen)
    ours = rf.call(reward, PROMPTS, COMPLETIONS, rf.row_fields(ROWS), completion_ids=[[1], [2], [3]])
    assert by_trl[:, 0].tolist() == ours
    assert set(trl_seen) == set(seen)
    for key in ("prompts", "completions", "completion_ids", "task", "weight"):
        assert trl_seen[key] == seen[key], key


def test_a_function_that_raises_is_reported_with_its_error_and_line(tmp_path):
    path = write(tmp_path, '''
        def _parse(text):
            return int(text)


        def reward(prompts, completions, **kwargs):
            return [float(_parse(c)) for c in completions]
    ''')
    message = refused(rf.call, rf.load("rewards.py:reward", tmp_path), PROMPTS, COMPLETIONS)
    assert message.startswith("Error: The reward function rewards.py:reward raised ValueError: invalid literal for "
                              "int() with base 10: 'Hello Ann!'")
    assert f"at {path}:3: return int(text)" in message  # the innermost frame in the user's file
    assert "Traceback" not in message and "fn(prompts, completions, **kwargs)" in message
    write(tmp_path, "def reward(completions):\n    return [0.0 for _ in completions]\n", "narrow.py")
    message = refused(rf.call, rf.load("narrow.py:reward", tmp_path), PROMPTS, COMPLETIONS)
    assert "narrow.py:reward raised TypeError" in message and "unexpected keyword argument" in message


def test_a_wrong_count_or_a_value_that_is_no_number_is_refused_naming_the_function(tmp_path):
    write(tmp_path, '''
        import math

        def too_few(prompts, completions, **kwargs):
            return [1.0]

        def text(prompts, completions, **kwargs):
            return [1.0, "good", 0.0]

        def endless(prompts, completions, **kwargs):
            return [1.0, math.inf, 0.0]

        def scalar(prompts, completions, **kwargs):
            return 1.0
    ''')
    load = lambda name: rf.load(f"rewards.py:{name}", tmp_path)  # noqa: E731
    assert "rewards.py:too_few returned 1 rewards for 3 completions" in refused(rf.call, load("too_few"), PROMPTS,
                                                                                COMPLETIONS)
    message = refused(rf.call, load("text"), PROMPTS, COMPLETIONS)
    assert "rewards.py:text" in message and "completion 1: 'good' (str), not a number or None" in message
    assert "not a finite number" in refused(rf.call, load("endless"), PROMPTS, COMPLETIONS)
    assert "rewards.py:scalar returned a float, not a list of 3 rewards" in refused(rf.call, load("scalar"), PROMPTS,
                                                                                   COMPLETIONS)


def test_none_nan_bools_numpy_and_async_functions_are_read_as_trl_reads_them(tmp_path):
    pytest.importorskip("numpy")
    write(tmp_path, '''
        import asyncio
        import numpy

        def mixed(prompts, completions, **kwargs):
            return [None, float("nan"), True, numpy.float32(0.5), numpy.array(2.0), 3]

        async def judged(prompts, completions, **kwargs):
            await asyncio.sleep(0)
            return [len(c) / 10 for c in completions]
    ''')
    six = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]
    assert rf.call(rf.load("rewards.py:mixed", tmp_path), six, six) == [None, None, 1.0, 0.5, 2.0, 3.0]
    assert rf.call(rf.load("rewards.py:judged", tmp_path), PROMPTS, COMPLETIONS) == [1.0, 0.8, 0.1]


def test_a_callable_object_or_a_partial_is_named_and_placed_by_what_it_calls(tmp_path):
    path = write(tmp_path, '''
        import functools

        class Scorer:
            def __call__(self, prompts, completions, scale=1.0, **kwargs):
                raise RuntimeError("no score today")

        scorer = Scorer()

        def scaled(prompts, completions, scale, **kwargs):
            return [scale * len(c) for c in completions]

        doubled = functools.partial(scaled, scale=2.0)
    ''')
    message = refused(rf.call, rf.load("rewards.py:scorer", tmp_path), PROMPTS, COMPLETIONS)
    assert "rewards.py:Scorer raised RuntimeError: no score today" in message and f"at {path}:6:" in message
    assert rf.call(rf.load("rewards.py:doubled", tmp_path), ["p"], ["abc"]) == [6.0]


def test_fields_must_hold_one_value_a_completion(tmp_path):
    write(tmp_path, RECORDING)
    reward = rf.load("rewards.py:reward", tmp_path)
    assert "'weight' passed to the reward function rewards.py:reward must be a list of 3" in refused(
        rf.call, reward, PROMPTS, COMPLETIONS, {"weight": [1, 2]})
    assert "given 2 prompts for 3 completions" in refused(rf.call, reward, PROMPTS[:2], COMPLETIONS)
