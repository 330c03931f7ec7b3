"""From K judged completions per prompt, the round's preference data: `best_worst` pairs or `ranked` groups.

Pure functions on plain rows (one per prompt: `row`, `prompt`, `prompt_ids`,
`completions`, `completion_ids`, `truncated`, and `scores`, one per completion,
None where the judge gave none). Before choosing, a prompt's completions lose:

- the unscored ones (`unscored`: an LLM judge's reply without a rating);
- the truncated ones, unless `keep_truncated` (`truncated_dropped`): an answer
  `max_new_tokens` cut is not the answer the model would have given, and
  preferring or rejecting it teaches the length limit (RLHFlow drops them too);
- repeats of an earlier completion's ids (`duplicates_merged`), as validation
  merges repeated responses.

`best_worst` (RLHFlow's iterative DPO): the highest score is chosen, the
lowest rejected, the first of equal scores on each side. A prompt whose best
and worst are tied is dropped and counted (`ties`), as is one left with fewer
than two completions (`too_few`). Rows: `prompt`, `chosen`, `rejected`
(validation's `pairs` shape) with `chosen_score`, `rejected_score`, and the
ids `prompt_ids`, `chosen_ids`, `rejected_ids`.

`ranked` (GDPO): all the completions, best first by the judge's score, stably
(`lexalign.data.ranking`, the order validation and GDPO use); more than
`group_size` keep the best, the worst and evenly spaced ones between, fewer
are dropped (`too_few`), every one tied is dropped (`all_tied`). Rows:
`prompt`, `responses`, `scores` (validation's `ranked` shape) with the ids
`prompt_ids`, `completion_ids`.

The rows go through the offline validation as any preference data; the reference
step and the trainer then read the sampled ids of the rows it kept, found by their
`source_row` (`lexalign.train.trainer_data.sampled_token_table`), never the text
encoded again.
"""

from __future__ import annotations

from lexalign.data.ranking import order_best_first, select_indices
from lexalign.generation.judges import TIE_TOLERANCE

COUNTS = ("prompts", "unscored", "truncated_dropped", "duplicates_merged", "too_few", "ties", "all_tied", "selected")


def usable(row: dict, keep_truncated: bool, counts: dict) -> list[int]:
    """Positions of the completions a prompt can be trained on, in their sampled order (counted as dropped)."""
    kept, seen = [], set()
    for i, (ids, score) in enumerate(zip(row["completion_ids"], row["scores"], strict=True)):
        if score is None:
            counts["unscored"] += 1
        elif row["truncated"][i] and not keep_truncated:
            counts["truncated_dropped"] += 1
        elif tuple(ids) in seen:
            counts["duplicates_merged"] += 1
        else:
            seen.add(tuple(ids))
            kept.append(i)
    return kept


def best_worst(rows: list[dict], keep_truncated: bool = False) -> tuple[list[dict], dict]:
    """(one chosen/rejected pair per prompt, the counts): see the module doc."""
    counts = dict.fromkeys(COUNTS, 0)
    out = []
    for row in rows:
        counts["prompts"] += 1
        kept = usable(row, keep_truncated, counts)
        if len(kept) < 2:
            counts["too_few"] += 1
            continue
        order = [kept[i] for i in order_best_first([row["scores"][i] for i in kept])]
        best = order[0]
        lowest = row["scores"][order[-1]]
        worst = next(i for i in order if row["scores"][i] - lowest <= TIE_TOLERANCE)  # the first of the lowest
        if abs(row["scores"][best] - row["scores"][worst]) <= TIE_TOLERANCE:
            counts["ties"] += 1
            continue
        counts["selected"] += 1
        out.append({"row": row["row"], "prompt": row["prompt"], "chosen": row["completions"][best],
                    "rejected": row["completions"][worst], "chosen_score": float(row["scores"][best]),
                    "rejected_score": float(row["scores"][worst]), "prompt_ids": list(row["prompt_ids"]),
                    "chosen_ids": list(row["completion_ids"][best]),
                    "rejected_ids": list(row["completion_ids"][worst])})
    return out, counts


def ranked(rows: list[dict], group_size: int, keep_truncated: bool = False) -> tuple[list[dict], dict]:
    """(one group of `group_size` completions per prompt, best first, the counts): see the module doc."""
    if group_size < 2:
        raise ValueError(f"group_size is {group_size}; a ranked group needs at least 2")
    counts = dict.fromkeys(COUNTS, 0)
    out = []
    for row in rows:
        counts["prompts"] += 1
        kept = usable(row, keep_truncated, counts)
        if len(kept) < group_size:
            counts["too_few"] += 1
            continue
        order = [kept[i] for i in order_best_first([row["scores"][i] for i in kept])]
        order = [order[i] for i in select_indices(len(order), group_size)]
        scores = [float(row["scores"][i]) for i in order]
        if scores[0] - scores[-1] <= TIE_TOLERANCE:
            counts["all_tied"] += 1
            continue
        counts["selected"] += 1
        out.append({"row": row["row"], "prompt": row["prompt"], "responses": [row["completions"][i] for i in order],
                    "scores": scores, "prompt_ids": list(row["prompt_ids"]),
                    "completion_ids": [list(row["completion_ids"][i]) for i in order]})
    return out, counts
