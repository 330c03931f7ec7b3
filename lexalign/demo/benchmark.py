"""The demo's lm-eval task, `lexalign_demo_polite`: on held-out greeting prompts, does the model find the polite
answer more likely than the rude one? (A multiple-choice task scored by log-likelihood: `acc` is the share of
prompts where it does.) The SFT model prefers the rude answer, the aligned one the polite answer.

The task (YAML) and its data (JSON Lines) are in `lm_eval_tasks/lexalign_demo_polite/`, registered with
lm-eval's TaskManager through `TASKS_DIR`; the data are the demo's held-out prompts (`task.HELD_OUT_PROMPTS`),
never trained on, written by `rows()` (a test checks the file and the function agree).
"""

from __future__ import annotations

import json
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
"""Local lm-eval tasks shipped with LexAlign (lm-eval's `include_path`)."""
DATA = TASKS_DIR / "lexalign_demo_polite" / "test.jsonl"


def rows() -> list[dict]:
    """One document per held-out prompt: the polite and the rude answer, the polite one's position alternating."""
    from lexalign.demo import task

    out = []
    for i, (name, prompt) in enumerate(task.HELD_OUT_PROMPTS):
        polite = task.WANTED_TEMPLATES[i % 2].format(name=name)
        rude = task.UNWANTED_TEMPLATES[(i // 2) % 2].format(name=name)
        choices, gold = ([polite, rude], 0) if i % 2 == 0 else ([rude, polite], 1)
        out.append({"prompt": prompt, "choices": choices, "gold": gold})
    return out


def dataset(**_):
    """The task's documents for lm-eval (`custom_dataset` in its YAML): the test split, read from DATA."""
    import datasets

    docs = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
