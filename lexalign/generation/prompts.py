"""The prompts the on-policy rounds sample from: read from their source (the demo, the validated preference data,
or a prompt file), distinct and in one seeded order; each round's slice of them; and the held-out prompts each
round's model is evaluated on."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple

from lexalign.core import io
from lexalign.core.errors import LexAlignError

KEY = "online.prompts.path"
REJECTS_KEPT = 1000
"""At most this many rejected rows are listed in prompts.json (all are counted)."""


class PromptFile(NamedTuple):
    """The usable rows of a prompt file, and the rest: each rejected row with its reason, counted by reason."""

    rows: list[dict]
    """Each usable row's fields (the prompt under `field`; judges read the others)."""
    rejects: list[dict]
    counts: dict[str, int]


def usable_prompt(value) -> str | None:
    """Why `value` is no prompt (None: it is one): a non-empty string, or chat messages ({role, content} each)."""
    if value is None:
        return "null_prompt"
    if isinstance(value, str):
        return None if value.strip() else "empty_prompt"
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return None
    return "not_a_prompt"


def read_prompt_file(path: str | Path, field: str, key: str = KEY) -> PromptFile:
    """Every row of a prompt file, read as preference data is read (JSON Lines, JSON, CSV/TSV, Parquet, Arrow, a
    compressed file, or a folder of them: its train split), each kept or rejected with a reason: a row that
    cannot be parsed, or whose `field` is missing, null, empty or neither a string nor chat messages. A file
    with no usable prompt stops here, with what it holds."""
    from lexalign.data.load import read_records

    path = Path(path)
    rows, bad = read_records(path)
    rejects = [{"file": r["_file"], "row": r["_row"], "reason": r["reason"], "detail": r["detail"]} for r in bad]
    kept = []
    for row in rows:
        where = {"file": row.pop("_file"), "row": row.pop("_row")}
        reason = "no_field" if field not in row else usable_prompt(row[field])
        if reason:
            rejects.append({**where, "reason": reason, "detail": repr(row.get(field))[:80]})
        else:
            kept.append(row)
    counts: dict[str, int] = {}
    for reject in rejects:
        counts[reject["reason"]] = counts.get(reject["reason"], 0) + 1
    if not kept:
        fields = sorted({key for row in rows for key in row})
        if not rows and not rejects:
            raise LexAlignError(f'The prompt file "{path}" ({key}) has no rows', "An empty file, or only blank lines",
                                hint=f"Point {key} at a file with one prompt a row")
        if rows and counts.get("no_field") == len(rows):
            raise LexAlignError(f'The prompt file "{path}" ({key}) has no field "{field}" in any of its '
                                f"{len(rows)} rows", f"Its fields: {', '.join(fields)}",
                                hint="Set online.prompts.prompt_field to the field that holds the prompt")
        raise LexAlignError(f'No usable prompt in "{path}" ({key}): all {len(rows) + len(bad)} rows rejected',
                            "Rejected: " + ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())),
                            *(f"Row {r['row']} of {r['file']}: {r['reason']} {r['detail']}" for r in rejects[:3]),
                            hint=f'Each row needs a non-empty string (or chat messages) in "{field}"')
    return PromptFile(kept, rejects, counts)


def check_prompt_file(path: str | Path | None, key: str = KEY) -> None:
    """The plan-time check of online.prompts.path: the file or folder exists, and its files are in a format
    LexAlign reads (their content is checked by the online_prompts step)."""
    from lexalign.core.paths import require_data
    from lexalign.data.load import data_files, detect_format

    fix = f"Fix {key} in config/config.yaml"
    found = require_data(path, key, fix)
    try:
        for file in data_files(found, "train"):
            detect_format(file)
    except LexAlignError as err:
        raise LexAlignError(f'Cannot read the prompts at "{path}" ({key}): {err.message}', *err.details,
                            hint=err.hint or fix) from None


class Collected(NamedTuple):
    """The prompts of a source: those the rounds sample, those set aside for evaluation, whether they are
    rendered already (the demo's frame, or validated data rendered with the chat template), how many rows were
    read, a prompt file's rejected rows (their count by reason, and the first REJECTS_KEPT of them) and each
    prompt's other fields (by the prompt as a judge reads it, `sampling.question`), which judges read beside the
    prompt."""

    sampled: list
    held_out: list
    rendered: bool
    read: int
    rejected: dict[str, int]
    rejects: list[dict]
    fields: dict[str, dict]
    plain: list[str]
    """Questions asked as they are, their answers shown side by side in each round's evaluation."""


def prompt_key(prompt) -> str:
    """One prompt's key, a string or chat messages alike: its JSON."""
    return json.dumps(prompt, sort_keys=True)


def collect_prompts(prompts: dict, seed: int, data: str | Path | None = None) -> Collected:
    """Every prompt of the source (the `online.prompts` section), distinct, in one seeded order; the last ones set
    aside for evaluation where the source has no held-out prompts of its own (`_needs_held_out`)."""
    from lexalign.generation.sampling import question

    rendered, fields, rejects, rejected, plain, held = False, {}, [], {}, [], None
    if prompts["from"] == "demo":
        from lexalign.demo import task

        # Already in the demo's own "User: ...\nAssistant:" frame, as SFT trained it: taken as they are.
        texts, rendered = [text for _, text in task.TRAIN_PROMPTS], True
    elif prompts["from"] == "preference_data":
        import pandas as pd

        from lexalign.data.validated import is_chat

        texts = pd.read_parquet(Path(data) / "train.parquet")["prompt"].astype(str).tolist()
        rendered = is_chat(data)
    elif prompts["from"] == "instructions":  # the project's own: held out by base task, not by count
        from lexalign.generation.instruction_set import prompt_set

        made = prompt_set(prompts.get("instructions") or {}, seed)
        texts, held, plain = [row["prompt"] for row in made.train], [row["prompt"] for row in made.held_out], \
            made.plain
        fields = {row["prompt"]: {k: v for k, v in row.items() if k != "prompt"} for row in made.train + made.held_out}
    else:
        field = prompts["prompt_field"]
        read = read_prompt_file(prompts["path"], field)
        texts, rejects, rejected = [row[field] for row in read.rows], read.rejects[:REJECTS_KEPT], read.counts
        for row in read.rows:  # the first row of a repeated prompt gives its fields
            others = {key: value for key, value in row.items() if key != field}
            if others:
                fields.setdefault(question(row[field]), others)
    distinct = list({prompt_key(t): t for t in texts}.values())
    random.Random(seed).shuffle(distinct)
    if not distinct:
        raise LexAlignError(f"No prompts in the online prompt source ({prompts['from']})")
    if held is not None:
        return Collected(distinct, held, rendered, len(texts), rejected, rejects, fields, plain)
    count = held_out_count(prompts, len(distinct)) if _needs_held_out(prompts, data) else 0
    if count >= len(distinct):
        raise LexAlignError(f"online.prompts.held_out is {count}, but the prompt source has {len(distinct)} distinct "
                            "prompts: none would be left to sample", hint="Lower online.prompts.held_out")
    return Collected(distinct[:len(distinct) - count], distinct[len(distinct) - count:], rendered,
                     len(texts) + sum(rejected.values()), rejected, rejects, fields, plain)


def _needs_held_out(prompts: dict, data) -> bool:
    """A source without held-out prompts of its own: a prompt file, or preference data with no eval split."""
    if prompts["from"] == "path":
        return True
    if prompts["from"] == "preference_data" and data:
        import pandas as pd

        return not len(pd.read_parquet(Path(data) / "eval.parquet", columns=["prompt"]))
    return False


def held_out_count(prompts: dict, distinct: int) -> int:
    """How many of `distinct` prompts are set aside for evaluation: online.prompts.held_out, or (null) a tenth,
    at least one of two or more."""
    if prompts.get("held_out") is not None:
        return prompts["held_out"]
    return max(distinct // 10, 1) if distinct >= 2 else 0


def round_prompts(prompts: dict, number: int, per_round: int | None) -> list:
    """Round `number`'s slice (1-based): the next `per_round` prompts, cycling; all of them with None."""
    everything = prompts["prompts"]
    if not per_round:
        return list(everything)
    start = (number - 1) * per_round
    return [everything[(start + i) % len(everything)] for i in range(per_round)]


def held_out_prompts(prompts: dict, source, data, seed: int, count: int) -> tuple[list, bool, bool]:
    """(prompts, whether they are rendered already, whether no round trains on them) for a round's evaluation:
    the demo's held-out prompts; the validated preference data's eval prompts; else (a prompt file, or no eval
    split) the prompts online_prompts set aside (online.prompts.held_out, or the held-out base tasks of from:
    instructions), or with none set aside the first
    prompts of the rounds' order, which a round may have sampled (said in eval.json)."""
    if prompts["from"] == "demo":
        from lexalign.demo import task

        return task.eval_prompts(seed, count), True, True
    if prompts["from"] == "preference_data" and data:
        import pandas as pd

        from lexalign.data.validated import is_chat

        evals = pd.read_parquet(Path(data) / "eval.parquet")
        if len(evals):
            chosen = sorted(set(evals["prompt"].astype(str)))
            random.Random(seed).shuffle(chosen)
            return chosen[:count], is_chat(data), True
    everything = io.read_json(source)
    if everything.get("held_out"):  # set aside by write_prompts: no round sampled them
        return everything["held_out"][:count], everything["rendered"], True
    return everything["prompts"][:count], everything["rendered"], False

