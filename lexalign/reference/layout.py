"""The groups of a validated split as a trainer sees them, and the names of reference files. Pure Python.

A reference file is named by what its log-probs depend on besides the data: the
layout (`lexalign.methods`: `pairs`, `unpaired` or `k<K>`), `max_length`, 4-bit
loading and the `bf16` setting (`setting_name`), never beta or the loss, so runs
differing only there share it. Snakemake reads these names when it plans (`SETTING_PATTERN`,
`parse_setting`): nothing here imports pandas or torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lexalign import methods
from lexalign.core import tokens
from lexalign.methods import Layout

TRUNCATION_MODE = "keep_start"
"""DPOConfig's default, which align uses: longer sequences lose their end."""
BF16_SUFFIXES = {True: "-bf16", False: "-fp32", "auto": "-bf16auto"}
"""The alignment's `bf16` in a reference file's name (unset: nothing): the dtype the log-probs are computed in
follows it (`lexalign.models.loading.training_bf16`) and the file's key records the one it resolved to."""
SETTING_PATTERN = rf"({methods.LAYOUT_PATTERN})-(max\d+|full)(-nf4)?(-bf16auto|-bf16|-fp32)?"
"""A reference file's name (without .parquet): layout, max_length, 4-bit loading and bf16."""


def layout_for(alignment: dict) -> str:
    """The reference layout an alignment section reads (lexalign.methods: Method.reference_layout)."""
    return methods.of(alignment).reference_layout(alignment)


def setting_name(alignment: dict) -> str:
    """The reference file an alignment reads: its layout, max_length, 4-bit loading and bf16."""
    length = f"max{alignment['max_length']}" if alignment["max_length"] else "full"
    quant = "-nf4" if alignment["load_in_4bit"] else ""
    return f"{layout_for(alignment)}-{length}{quant}{BF16_SUFFIXES.get(alignment.get('bf16'), '')}"


def parse_setting(name: str) -> dict:
    """The reference step's `setting` from a file name made by `setting_name`."""
    layout, length, quant, bf16 = re.fullmatch(SETTING_PATTERN, name).groups()
    return {"layout": layout, "max_length": int(length[3:]) if length != "full" else None,
            "truncation_mode": TRUNCATION_MODE, "load_in_4bit": quant is not None,
            "bf16": {suffix: value for value, suffix in BF16_SUFFIXES.items()}.get(bf16)}


def responses(layout: str) -> int:
    """K, the responses scored per group of `layout` (2 for pairs and KTO's rows)."""
    return methods.parse_layout(layout)[1]


@dataclass
class Groups:
    """The groups of one split as the trainer sees them: K responses per prompt, best first."""

    rows: list[int]
    """Position of each group's row in the split's frame."""
    prompts: list[str]
    responses: list[list[str]]
    scores: list[list[float]]
    dropped: int = 0
    """Rows with fewer than K responses (GDPO drops them)."""
    chat: bool = False
    """The texts were rendered by the model's chat template (`lexalign.core.tokens`: no special tokens added)."""

    def __len__(self) -> int:
        return len(self.rows)


KL_LOOKBACK = 64
"""How far back the KL term's mismatched completion is looked for (a row with another prompt)."""


def unpaired_rows(frame) -> tuple[list[int], list[str], list[str], list[bool]]:
    """KTO's rows of a validated frame: (row, prompt, completion, label) of each. Unpaired data (completion and
    label columns) as they are; pairs split into one desirable row (chosen) and one undesirable row (rejected),
    side by side, so every batch holds both."""
    if not len(frame):
        return [], [], [], []
    if {"completion", "label"} <= set(frame.columns):
        return (list(range(len(frame))), frame["prompt"].astype(str).tolist(),
                frame["completion"].astype(str).tolist(), [bool(v) for v in frame["label"]])
    rows, prompts, completions, labels = [], [], [], []
    for i, (prompt, chosen, rejected) in enumerate(zip(frame["prompt"].astype(str), frame["chosen"].astype(str),
                                                       frame["rejected"].astype(str), strict=True)):
        rows += [i, i]
        prompts += [prompt, prompt]
        completions += [chosen, rejected]
        labels += [True, False]
    return rows, prompts, completions, labels


def kl_partners(prompts: list[str]) -> list[int]:
    """For each row, the row whose completion is its KL term's mismatched completion: the nearest earlier row
    (cyclically) with another prompt, else the row before. Fixed by the data alone, never by the batch size, so
    the reference step scores it once; with sequential batches almost every KL completion is one of the
    batch's own completions, paired with another prompt (as TRL's rotation within a batch)."""
    n = len(prompts)
    out = []
    for i in range(n):
        partner = (i - 1) % n
        for back in range(1, min(n, KL_LOOKBACK + 1)):
            if prompts[(i - back) % n] != prompts[i]:
                partner = (i - back) % n
                break
        out.append(partner)
    return out


def split_groups(frame, layout: str, chat: bool | None = None) -> Groups:
    """The groups of `frame` (a validated split, a pandas frame) in `layout`: (prompt, chosen, rejected) pairs,
    GDPO's ranked groups of K, or KTO's rows (completion and KL completion, the label as the score)."""
    kind, k = methods.parse_layout(layout)
    chat = tokens.chat_rendered(frame) if chat is None else chat
    if kind is Layout.UNPAIRED:
        rows, prompts, completions, labels = unpaired_rows(frame)
        partners = kl_partners(prompts)
        return Groups(rows, prompts, [[c, completions[j]] for c, j in zip(completions, partners, strict=True)],
                      [[float(label)] * 2 for label in labels], chat=bool(chat))
    if kind is Layout.PAIRS:
        n = len(frame)
        if not n:
            return Groups([], [], [], [], chat=bool(chat))
        prompts = frame["prompt"].astype(str).tolist()
        chosen, rejected = frame["chosen"].astype(str), frame["rejected"].astype(str)
        responses = [list(pair) for pair in zip(chosen, rejected, strict=True)]
        return Groups(list(range(n)), prompts, responses, [[1.0, 0.0]] * n, chat=bool(chat))
    from lexalign.data.ranking import iter_ranked_groups

    out, dropped = Groups([], [], [], [], chat=bool(chat)), 0
    for position, group in iter_ranked_groups(frame, k) if len(frame) else ():
        if group is None:
            dropped += 1
            continue
        out.rows.append(position)
        out.prompts.append(str(group["prompt"]))
        out.responses.append(group["responses"])
        out.scores.append(group["scores"])
    out.dropped = dropped
    return out
