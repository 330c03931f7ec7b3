"""The datasets the preference trainers read: tokenized rows in TRL's column names, with or without reference
log-probs.

With the reference step's file (`lexalign.reference`) the tokens and the reference
log-probs come from it (`trainer_dataset`); without one (align with no reference
step, and the reference-free ORPO, SimPO and CPO, which never have one) the
split is tokenized here by the same rule (`tokenized_dataset`), so training never
falls back to TRL's own tokenization of rendered chat text.
"""

from __future__ import annotations

from lexalign.groups import check_groups
from lexalign.methods import Layout, parse_layout
from lexalign.reference.cache import token_table
from lexalign.reference.layout import split_groups

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


def tokenized_dataset(tokenizer, frame, layout: str, split: str, workers: int | None = None):
    """A validated split (a pandas frame) tokenized for the trainer, without reference log-probs: the same tokens
    as the reference step's (`lexalign.tokens`). GDPO's groups with fewer than K responses are dropped, said."""
    import pyarrow as pa

    groups = split_groups(frame, layout)
    kind, k = parse_layout(layout)
    if kind is Layout.RANKED:
        check_groups(len(groups), groups.dropped, len(frame), k, split)
    table = token_table(tokenizer, groups, workers)
    table = table.append_column("scores", pa.array(groups.scores, type=pa.list_(pa.float64())))
    return trainer_dataset(table, layout)
