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


def read_prompt_file(path: Path, field: str) -> list:
    import pandas as pd

    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_json(path, lines=path.suffix == ".jsonl")
    if field not in frame.columns:
        raise LexAlignError(f'The prompt file "{path}" has no field "{field}"',
                            f"Its fields: {', '.join(map(str, frame.columns))}",
                            hint="Set online.prompts.prompt_field")
    return frame[field].tolist()


class Collected(NamedTuple):
    """The prompts of a source: those the rounds sample, those set aside for evaluation, whether they are
    rendered already (the demo's frame, or validated data rendered with the chat template), and how many rows
    were read."""

    sampled: list
    held_out: list
    rendered: bool
    read: int


def collect_prompts(prompts: dict, seed: int, data: str | Path | None = None) -> Collected:
    """Every prompt of the source (the `online.prompts` section), distinct, in one seeded order; the last ones set
    aside for evaluation where the source has no held-out prompts of its own (`_needs_held_out`)."""
    rendered = False
    if prompts["from"] == "demo":
        from lexalign.demo import task

        # Already in the demo's own "User: ...\nAssistant:" frame, as SFT trained it: taken as they are.
        texts, rendered = [text for _, text in task.TRAIN_PROMPTS], True
    elif prompts["from"] == "preference_data":
        import pandas as pd

        from lexalign.data.validated import is_chat

        texts = pd.read_parquet(Path(data) / "train.parquet")["prompt"].astype(str).tolist()
        rendered = is_chat(data)
    else:
        texts = read_prompt_file(Path(prompts["path"]), prompts["prompt_field"])
    distinct = list({json.dumps(t, sort_keys=True): t for t in texts}.values())
    random.Random(seed).shuffle(distinct)
    if not distinct:
        raise LexAlignError(f"No prompts in the online prompt source ({prompts['from']})")
    count = held_out_count(prompts, len(distinct)) if _needs_held_out(prompts, data) else 0
    if count >= len(distinct):
        raise LexAlignError(f"online.prompts.held_out is {count}, but the prompt source has {len(distinct)} distinct "
                            "prompts: none would be left to sample", hint="Lower online.prompts.held_out")
    return Collected(distinct[:len(distinct) - count], distinct[len(distinct) - count:], rendered, len(texts))


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
    split) the prompts write_prompts set aside (online.prompts.held_out), or with none set aside the first
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

