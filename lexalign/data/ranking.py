"""Ranked responses, one home for the rules every step reads them by, and pairwise preferences grouped into them.

Validation (`lexalign.data.shapes`, and `group_pairs` here), the reference step, the trainers of ranked groups,
evaluation and the online rounds' selection all read groups the same way: sorted by score, best first and stably
(tied responses keep their given order, `order_best_first`); a group of more than K keeps the best, the worst and
evenly spaced ones between (`select_indices`); one of fewer than K is dropped (`check_groups` says so).

Pairwise preferences become rankings by this rule, for all the pairs of one prompt (after the row checks):

1. Responses are the nodes and each pair an edge, chosen → rejected.
2. Responses on a cycle (A > B > C > A, or A > B and B > A) cannot be ordered
   from the data: each strongly connected component becomes one tied rank.
3. The remaining graph has no cycles. A response's score is the length of the
   longest chain of wins below it (0 for responses that beat nothing), so
   every chosen response scores above its rejected one: a topological order.
   Responses the pairs do not order against each other (A > B and A > C)
   get equal scores, a tie.
4. Responses are sorted by score, best first; ties keep their first appearance.
5. With more than K responses the best, the worst and evenly spaced ones
   between are kept; with fewer than K, or when every response is tied, all
   the prompt's rows are rejected (`too_few_responses`, `all_tied`).

The report counts prompts ranked, those with a total order, with ties and with
cycles, and the pairs that were used.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

from lexalign.core.errors import LexAlignError, warn
from lexalign.data.common import reject

if TYPE_CHECKING:  # annotations only
    import pandas as pd


def _components(nodes: int, edges: set[tuple[int, int]]) -> list[int]:
    """The strongly connected component of each node (Tarjan, iterative)."""
    succ = defaultdict(list)
    for a, b in sorted(edges):
        succ[a].append(b)
    index, low, on_stack, stack, comp = {}, {}, set(), [], [-1] * nodes
    counter, label = 0, 0
    for root in range(nodes):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            if i < len(succ[node]):
                work.append((node, i + 1))
                nxt = succ[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp[member] = label
                    if member == node:
                        break
                label += 1
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return comp


def rank(pairs: list[tuple[str, str]]) -> tuple[list[str], list[float], dict]:
    """Responses best first, their scores, and what the rule met (`cycle`, `tie`)."""
    ids: dict[str, int] = {}
    for chosen, rejected in pairs:
        ids.setdefault(chosen, len(ids))
        ids.setdefault(rejected, len(ids))
    edges = {(ids[c], ids[r]) for c, r in pairs}
    comp = _components(len(ids), edges)
    n_comp = max(comp) + 1
    below = defaultdict(set)
    for a, b in edges:
        if comp[a] != comp[b]:
            below[comp[a]].add(comp[b])
    height: dict[int, int] = {}
    for start in range(n_comp):  # longest chain below each component, iteratively
        work = [start]
        while work:
            node = work[-1]
            if node in height:
                work.pop()
                continue
            pending = [b for b in below[node] if b not in height]
            if pending:
                work.extend(pending)
                continue
            height[node] = 1 + max((height[b] for b in below[node]), default=-1)
            work.pop()
    responses = list(ids)
    scores = [float(height[comp[i]]) for i in range(len(responses))]
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    sizes = defaultdict(int)
    for c in comp:
        sizes[c] += 1
    info = {"cycle": any(s > 1 for s in sizes.values()), "tie": len(set(scores)) < len(scores)}
    return [responses[i] for i in order], [scores[i] for i in order], info


def group_pairs(rows: list[tuple], k: int, names: tuple[str, str, str]) -> tuple[list[dict], list[dict], dict]:
    """Rankings of K responses from pairwise rows `(prompt, chosen, rejected, row, file)`.

    Returns the ranked rows (prompt, chosen, rejected, responses, scores,
    source_row, source_rows), the rejects and the counts for the report.
    """
    by_prompt: dict[str, list[tuple]] = {}
    for row in rows:
        by_prompt.setdefault(row[0], []).append(row)
    out, rejects = [], []
    stats = {"prompts": len(by_prompt), "pairs": len(rows), "total_order": 0, "with_ties": 0, "with_cycles": 0,
             "pairs_used": 0}
    p_name, c_name, r_name = names
    for prompt, group in by_prompt.items():
        responses, scores, info = rank([(g[1], g[2]) for g in group])
        stats["with_cycles"] += info["cycle"]
        stats["with_ties"] += info["tie"] and not info["cycle"]
        stats["total_order"] += not info["tie"]
        problem = None
        if len(responses) < k:
            problem = ("too_few_responses", f"the prompt's {len(group)} pairs rank {len(responses)} distinct "
                                            f"responses; group_size is {k}")
        else:
            keep = select_indices(len(responses), k)
            responses, scores = [responses[i] for i in keep], [scores[i] for i in keep]
            if scores[0] == scores[-1]:
                problem = ("all_tied", "the prompt's pairs contradict each other: every response is tied")
        if problem:
            for _, chosen, rejected, number, file in group:
                rejects.append(reject(number, file, *problem, {p_name: prompt, c_name: chosen, r_name: rejected}))
            continue
        stats["pairs_used"] += len(group)
        origins = sorted((g[3], g[4]) for g in group)
        out.append({"prompt": prompt, "chosen": responses[0], "rejected": responses[-1], "responses": responses,
                    "scores": scores, "source_row": origins[0][0], "source_rows": [o[0] for o in origins],
                    "_files": [o[1] for o in origins]})
    return out, rejects, stats


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
    from lexalign import methods

    keys = " or ".join(f"{m.name}'s {m.group_key}" for m in methods.METHODS.values() if m.group_key)
    if dropped:
        warn(f"Dropped {dropped} of {total} {split} groups with fewer than {k} responses (K = {k}: {keys})")
    if not kept and total:
        raise LexAlignError(
            f"No {split} group has {k} ranked responses (K = {k}: {keys})",
            hint=f"Use ranked data with at least that many responses per prompt, or lower {keys} "
                 "(2 uses plain chosen/rejected pairs)",
        )
