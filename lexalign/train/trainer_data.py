"""The datasets the preference trainers read: tokenized rows in TRL's column names, with or without reference
log-probs.

With the reference step's file (`lexalign.reference`) the tokens and the reference
log-probs come from it (`trainer_dataset`); without one (align with no reference
step, and the reference-free ORPO, SimPO and CPO, which never have one) the
split is tokenized here by the same rule (`tokenized_dataset`), so training never
falls back to TRL's own tokenization of rendered chat text. An online round's
data are never tokenized: their ids are the ones sampled (`sampled_token_table`,
from the round's selection), since decoding sampled ids and encoding the text
again can give other tokens.
"""

from __future__ import annotations

from lexalign.core.errors import LexAlignError
from lexalign.data.ranking import check_groups
from lexalign.methods import Layout, parse_layout
from lexalign.reference.cache import token_table
from lexalign.reference.layout import kl_partners, split_groups, unpaired_rows

TWO_RESPONSE_COLUMNS = {
    Layout.PAIRS: (("chosen_ids", "rejected_ids"), ("ref_chosen_logps", "ref_rejected_logps")),
    Layout.UNPAIRED: (("completion_ids", "KL_completion_ids"), ("ref_logps", "ref_KL_logps")),
}
"""TRL's names for the two responses of a row and their reference log-probs (DPOTrainer's, KTOTrainer's)."""


def trainer_dataset(table, layout: str):
    """A tokenized `datasets.Dataset` from a reference file's table, in the columns the trainer reads.

    Pairs: prompt_ids, chosen_ids, rejected_ids, ref_chosen_logps, ref_rejected_logps.
    Ranked (GDPO): prompt_ids, completion_ids, scores, ref_logps.
    Unpaired (KTO): prompt_ids, completion_ids, KL_completion_ids, label, ref_logps, ref_KL_logps.
    Without `ref_logps` in the table the log-prob columns are left out: the trainer runs the reference itself.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if table.num_rows == 0:
        return None
    kind = parse_layout(layout)[0]
    scored = "ref_logps" in table.column_names
    if kind is Layout.RANKED:
        names = ("prompt_ids", "completion_ids", "scores", "ref_logps") if scored else \
            ("prompt_ids", "completion_ids", "scores")
        return Dataset(InMemoryTable(pa.table({name: table.column(name) for name in names})))
    # Two responses per row, split into TRL's columns: chosen and rejected, or KTO's completion and KL completion.
    ids, logps = TWO_RESPONSE_COLUMNS[kind]
    completions = table.column("completion_ids")
    columns = {"prompt_ids": table.column("prompt_ids"),
               **{name: pc.list_element(completions, i) for i, name in enumerate(ids)}}
    if kind is Layout.UNPAIRED:
        columns["label"] = pc.greater(pc.list_element(table.column("scores"), 0), 0.5)
    if scored:
        columns.update({name: pc.list_element(table.column("ref_logps"), i) for i, name in enumerate(logps)})
    return Dataset(InMemoryTable(pa.table(columns)))


def tokenized_dataset(tokenizer, frame, layout: str, split: str, workers: int | None = None,
                      sampled: list[dict] | None = None):
    """A validated split (a pandas frame) tokenized for the trainer, without reference log-probs: the same tokens
    as the reference step's (`lexalign.core.tokens`). GDPO's groups with fewer than K responses are dropped, said.
    `sampled`: an online round's selection records, whose sampled ids are taken instead of tokenizing."""
    import pyarrow as pa

    groups = split_groups(frame, layout)
    kind, k = parse_layout(layout)
    if kind is Layout.RANKED:
        check_groups(len(groups), groups.dropped, len(frame), k, split)
    table = token_table(tokenizer, groups, workers) if sampled is None else \
        sampled_token_table(frame, layout, sampled)
    table = table.append_column("scores", pa.array(groups.scores, type=pa.list_(pa.float64())))
    return trainer_dataset(table, layout)


def read_selection(path) -> list[dict]:
    """An online round's selection (`lexalign.generation.selection`, JSON Lines): one record a line, in order, so a
    validated row's `source_row` (1-based) is its line."""
    import json
    from pathlib import Path

    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def sampled_ids(frame, records: list[dict]) -> list[tuple[list, dict, list]]:
    """For each row of a validated split (`frame`, in its order) of the selection `records`: its prompt's ids,
    each of its responses' ids by text, found by the row's `source_row` (validation merges responses whose texts
    are equal, so a group may have lost one; the first sampled ids of a text stand for it), and the row's
    response texts in its order (chosen, rejected; or the ranked group's)."""
    out = []
    for row in frame.to_dict("records"):
        line = int(row["source_row"])
        record = records[line - 1] if 0 < line <= len(records) else {}
        if "chosen_ids" in record:
            texts, ids = [record["chosen"], record["rejected"]], [record["chosen_ids"], record["rejected_ids"]]
            wanted = [row["chosen"], row["rejected"]]
        else:
            texts, ids = record.get("responses", []), record.get("completion_ids", [])
            wanted = list(row["responses"]) if row.get("responses") is not None else [row.get("chosen")]
        by_text = {}
        for text, seq in zip(texts, ids, strict=True):
            by_text.setdefault(text, list(seq))
        if row["prompt"] != record.get("prompt") or any(t not in by_text for t in wanted):
            raise LexAlignError(f"Validated row {row['source_row']} does not match the round's selection",
                                hint="Validate the selection's own JSON Lines, written in the selection's order")
        out.append((list(record["prompt_ids"]), by_text, wanted))
    return out


def sampled_token_table(frame, layout: str, records: list[dict]):
    """The token table (`lexalign.reference.cache.token_table`'s columns) of `frame`'s groups in `layout`, in
    `split_groups`' order, from the ids the selection `records` were sampled with, never re-encoding text.
    KTO's rows (`unpaired`) are the pairs split as `split_groups` splits them: each completion with its row's
    prompt ids, and the KL completion's ids from the row it was taken from."""
    import pyarrow as pa

    rows = sampled_ids(frame, records)
    kind = parse_layout(layout)[0]
    if kind is Layout.UNPAIRED:
        positions, prompts, completions, _ = unpaired_rows(frame)
        ids = [rows[p][1][c] for p, c in zip(positions, completions, strict=True)]
        prompt_ids = [rows[p][0] for p in positions]
        completion_ids = [[ids[i], ids[j]] for i, j in enumerate(kl_partners(prompts))]
    else:
        groups = split_groups(frame, layout)
        prompt_ids = [rows[p][0] for p in groups.rows]
        completion_ids = [[rows[p][1][text] for text in responses]
                          for p, responses in zip(groups.rows, groups.responses, strict=True)]
    ids_type = pa.list_(pa.int32())
    return pa.table({"prompt_ids": pa.array(prompt_ids, type=ids_type),
                     "completion_ids": pa.array(completion_ids, type=pa.list_(ids_type))})
