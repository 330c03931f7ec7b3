"""Pairwise preferences grouped by prompt into rankings, for GDPO's K responses per prompt.

The rule, for all the pairs of one prompt (after the row checks):

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

from collections import defaultdict

from lexalign.data.common import reject
from lexalign.groups import select_indices


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
