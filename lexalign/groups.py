"""Ranked responses: one home for ordering them by score and picking K of them.

Validation (`lexalign.data.shapes`, `lexalign.data.ranking`), the reference
step and GDPO's training and evaluation all read groups the same way: sorted
by score, best first and stably (tied responses keep their given order); a
group of more than K keeps the best, the worst and evenly spaced ones between;
one of fewer than K is dropped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lexalign.core.errors import LexAlignError, warn

if TYPE_CHECKING:  # annotations only: the reference step's file names are read at planning time, light
    import pandas as pd


def order_best_first(scores: list[float]) -> list[int]:
    """Positions sorted by score, best first; ties keep their given order."""
    return sorted(range(len(scores)), key=lambda i: -float(scores[i]))


def select_indices(n: int, k: int) -> list[int]:
    """K of n ranked positions: the best (0), the worst (n-1) and evenly spaced ones between."""
    if k < 1 or n < k:
        raise ValueError(f"cannot pick {k} of {n}")
    if k == 1:
        return [0]
    return [int(math.floor(i * (n - 1) / (k - 1) + 0.5)) for i in range(k)]


def _as_list(value) -> list:
    return list(value) if value is not None and not isinstance(value, str) else []


def iter_ranked_groups(frame: pd.DataFrame, k: int):
    """(position in `frame`, group) for each row: the group of exactly K responses best first, or None.

    Reads `responses`/`scores` when present (scores default to the given order,
    strictly), else `chosen`/`rejected` as a group of two. Responses are sorted
    by score, best first, stably: tied responses keep their given order. A
    group with more than K responses keeps the best, the worst and evenly
    spaced ones between; one with fewer is None (dropped).
    """
    ranked = "responses" in frame.columns
    for position, record in enumerate(frame.to_dict("records")):
        if ranked:
            responses = [str(r) for r in _as_list(record["responses"])]
            scores = _as_list(record.get("scores"))
            if len(scores) != len(responses):
                scores = [float(len(responses) - 1 - i) for i in range(len(responses))]
        else:
            responses, scores = [record["chosen"], record["rejected"]], [1.0, 0.0]
        if len(responses) < k:
            yield position, None
            continue
        order = order_best_first(scores)
        order = [order[i] for i in select_indices(len(order), k)]
        yield position, {"prompt": record["prompt"], "responses": [responses[i] for i in order],
                         "scores": [float(scores[i]) for i in order]}


def ranked_groups(frame: pd.DataFrame, k: int) -> tuple[list[dict], int]:
    """Rows of `frame` as groups of exactly K responses best first (see `iter_ranked_groups`),
    and how many groups were dropped for having fewer than K responses."""
    groups = [group for _, group in iter_ranked_groups(frame, k)]
    rows = [group for group in groups if group is not None]
    return rows, len(groups) - len(rows)


def check_groups(kept: int, dropped: int, total: int, k: int, split: str) -> None:
    """Warn about dropped groups (fewer than K responses); fail when a non-empty split has none left."""
    if dropped:
        warn(f"GDPO: dropped {dropped} of {total} {split} groups with fewer than {k} responses "
             f"(group_delay_size: {k})")
    if not kept and total:
        raise LexAlignError(
            f"No {split} group has {k} ranked responses (group_delay_size: {k})",
            hint="Use ranked data with at least that many responses per prompt, or lower group_delay_size "
                 "(2 uses plain chosen/rejected pairs)",
        )
