"""Row checks on whole batches: pyarrow kernels and numpy masks, no per-row Python where it matters.

A canonical batch is a pyarrow table with `prompt`, `chosen`, `rejected`
(strings) and `_row` (the row numbers), plus `responses` and `scores` (lists)
for ranked data. Checks return the rows kept and reject records for the rest;
a row gets the reason of the first check it fails.
"""

from __future__ import annotations

import json

import numpy as np

from lexalign.data.common import Piece, hash_strings, reject
from lexalign.data.load import piece_records
from lexalign.data.shapes import ChatRenderer, Plan, Rejected, pair_row, ranked_row, unpaired_row
from lexalign.methods import Layout

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def _pa():
    import pyarrow as pa
    import pyarrow.compute as pc

    return pa, pc


def _string_column(column):
    """The column as pyarrow `string`, or None when it holds something else."""
    pa, _ = _pa()
    kind = column.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view":
        return column.cast(pa.string()) if column.type != pa.string() else column
    return None


def _with_rows(table, rows: np.ndarray):
    pa, _ = _pa()
    return table.append_column("_row", pa.array(rows, type=pa.int64()))


def normalise(piece: Piece, plan: Plan, renderer: ChatRenderer, input_sizes: dict) -> tuple[object, list[dict]]:
    """A piece as a canonical table, and the rows that could not be normalised.

    `input_sizes` counts ranked rows by how many responses they held before any were dropped.
    """
    pa, _ = _pa()
    if piece.table is not None and plan.fast_fields and all(f in piece.table.column_names for f in plan.fast_fields):
        columns = [_string_column(piece.table.column(f)) for f in plan.fast_fields]
        if all(c is not None for c in columns):
            return _with_rows(pa.table(dict(zip(PAIR_COLUMNS, columns, strict=False))), piece.rows), []
    records = piece_records(piece)
    if plan.layout is Layout.UNPAIRED:
        return _normalise_unpaired(piece, records, plan, renderer, input_sizes)
    rejects, kept, rows = [], [], []
    ranked = plan.layout is Layout.RANKED
    for number, record in zip(piece.rows.tolist(), records, strict=False):
        try:
            if ranked:
                prompt, responses, scores, n = ranked_row(record, plan, renderer, piece.text_cells)
                input_sizes[n] = input_sizes.get(n, 0) + 1
                kept.append((prompt, responses[0], responses[-1], responses, scores))
            else:
                kept.append(pair_row(record, plan, renderer, piece.text_cells))
            rows.append(number)
        except Rejected as err:
            rejects.append(reject(number, piece.file, err.reason, err.detail, record))
    columns = list(zip(*kept, strict=False)) if kept else [()] * (5 if ranked else 3)
    data = {name: pa.array(col, type=pa.string()) for name, col in zip(PAIR_COLUMNS, columns, strict=False)}
    if ranked:
        data["responses"] = pa.array(columns[3], type=pa.list_(pa.string()))
        data["scores"] = pa.array(columns[4], type=pa.list_(pa.float64()))
    return _with_rows(pa.table(data), np.asarray(rows, dtype=np.int64)), rejects


def _normalise_unpaired(piece: Piece, records: list[dict], plan: Plan, renderer: ChatRenderer,
                        input_sizes: dict) -> tuple[object, list[dict]]:
    """Unpaired rows as a canonical table: prompt, completion (strings), label (bool), _row."""
    pa, _ = _pa()
    rejects, kept, rows = [], [], []
    for number, record in zip(piece.rows.tolist(), records, strict=False):
        try:
            kept.append(unpaired_row(record, plan, renderer, piece.text_cells))
            rows.append(number)
        except Rejected as err:
            rejects.append(reject(number, piece.file, err.reason, err.detail, record))
    input_sizes[1] = input_sizes.get(1, 0) + len(kept)
    prompts, completions, labels = (list(c) for c in zip(*kept, strict=True)) if kept else ([], [], [])
    table = pa.table({"prompt": pa.array(prompts, type=pa.string()),
                      "completion": pa.array(completions, type=pa.string()),
                      "label": pa.array(labels, type=pa.bool_())})
    return _with_rows(table, np.asarray(rows, dtype=np.int64)), rejects


def _invalid_utf8(column) -> np.ndarray | None:
    """Rows whose bytes are not valid UTF-8 (pyarrow does not check on read), or None when all are."""
    pa, _ = _pa()
    try:
        column.validate(full=True)
        return None
    except pa.ArrowInvalid:
        raw = column.cast(pa.binary()).to_pylist()
        bad = np.zeros(len(raw), dtype=bool)
        for i, value in enumerate(raw):
            if value is not None:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    bad[i] = True
        return bad


def _safe_values(table, index: np.ndarray) -> list[dict]:
    pa, _ = _pa()
    part = table.take(pa.array(index, type=pa.int64())).drop_columns(["_row"])
    return piece_records(Piece("", index, table=part))


def check_pairs(table, file: str, plan: Plan) -> tuple[object, list[dict]]:
    """Null, undecodable, empty or whitespace-only fields, and chosen identical to rejected."""
    pa, pc = _pa()
    n = table.num_rows
    if n == 0 or "responses" in table.column_names or "label" in table.column_names:
        return table, []  # ranked and unpaired rows were checked row by row as they were normalised
    names = dict(zip(PAIR_COLUMNS, (plan.prompt, plan.chosen, plan.rejected), strict=True))
    code = np.zeros(n, dtype=np.int16)  # 0: kept; k: the k-th (reason, detail) marked
    found: list[tuple[str, str]] = []

    def mark(mask, reason: str, text: str) -> None:
        new = mask & (code == 0)
        if new.any():
            found.append((reason, text))
            code[new] = len(found)

    for column in PAIR_COLUMNS:
        values = table.column(column)
        if values.null_count:
            mark(values.is_null().to_numpy(zero_copy_only=False), "null_field", f"{names[column]} is null")
    for column in PAIR_COLUMNS:
        bad = _invalid_utf8(table.column(column).combine_chunks())
        if bad is not None:
            mark(bad, "undecodable_bytes", f"{names[column]} holds bytes that are not valid UTF-8")
    valid = code == 0
    if valid.all():  # the kernels below want valid, non-null text
        work, positions = table, None
    else:
        work, positions = table.filter(pa.array(valid)), np.flatnonzero(valid)

    def full(mask: np.ndarray) -> np.ndarray:
        if positions is None:
            return mask
        out = np.zeros(n, dtype=bool)
        out[positions] = mask
        return out

    for column in PAIR_COLUMNS:
        values = work.column(column)
        mark(full(pc.binary_length(values).to_numpy(zero_copy_only=False) == 0), "empty_field",
             f"{names[column]} is empty")
        mark(full(pc.utf8_is_space(values).to_numpy(zero_copy_only=False)), "empty_field",
             f"{names[column]} is whitespace only")
    same = pc.equal(work.column("chosen"), work.column("rejected")).to_numpy(zero_copy_only=False)
    mark(full(same), "chosen_equals_rejected", f"{plan.chosen} and {plan.rejected} are identical")
    dropped = code != 0
    if not dropped.any():
        return table, []
    index = np.flatnonzero(dropped)
    rows = table.column("_row").to_numpy()
    rejects = [reject(int(rows[i]), file, *found[code[i] - 1], {names[k]: v.get(k) for k in PAIR_COLUMNS})
               for i, v in zip(index.tolist(), _safe_values(table, index), strict=True)]
    return table.filter(pa.array(~dropped)), rejects


class Deduper:
    """Exact duplicates across the whole dataset: a 128-bit key per row (prompt hash, response hash).

    The prompt hash is seeded (it also decides the train/eval split); the
    response hash covers chosen and rejected with chosen's length as seed, so
    no separator can make two different rows look alike. The first occurrence
    is kept; later ones are rejected as `duplicate_row`, naming the first.
    """

    def __init__(self):
        self.first: dict[bytes, int] = {}
        self.files: list[str] = []

    def __call__(self, table, file: str, prompt_hash: np.ndarray, plan: Plan) -> tuple[np.ndarray, list[dict]]:
        pa, pc = _pa()
        if table.num_rows == 0:
            return np.ones(0, dtype=bool), []
        if file not in self.files:
            self.files.append(file)
        code = self.files.index(file) << 40
        if "label" in table.column_names:  # unpaired: the same completion may carry either label once
            keys = [json.dumps([c, bool(v)], ensure_ascii=False) for c, v in
                    zip(table.column("completion").to_pylist(), table.column("label").to_pylist(), strict=True)]
            response_hash = hash_strings(keys)
        elif "responses" in table.column_names:
            responses = table.column("responses").to_pylist()
            scores = table.column("scores").to_pylist()
            keys = [json.dumps([r, s], ensure_ascii=False) for r, s in zip(responses, scores, strict=False)]
            response_hash = hash_strings(keys)
        else:  # chosen and rejected joined, chosen's length as seed: no separator can make two pairs alike
            joined = pc.binary_join_element_wise(table.column("chosen"), table.column("rejected"), "\x00")
            lengths = pc.binary_length(table.column("chosen")).to_numpy(zero_copy_only=False)
            response_hash = hash_strings(joined, seeds=lengths)
        keys = np.stack([prompt_hash, response_hash], axis=1).view("V16").ravel().tolist()
        rows = table.column("_row").to_numpy()
        codes = (rows + code).tolist()
        first = np.fromiter(map(self.first.setdefault, keys, codes), dtype=np.int64, count=len(codes))
        duplicate = first != np.asarray(codes, dtype=np.int64)
        if not duplicate.any():
            return ~duplicate, []
        index = np.flatnonzero(duplicate)
        values = _safe_values(table, index)
        rejects = []
        for i, value in zip(index.tolist(), values, strict=False):
            origin = int(first[i])
            where = self.files[origin >> 40]
            detail = f"same as row {origin & ((1 << 40) - 1)}" + (f" of {where}" if where != file else "")
            if "label" in value:
                data = {plan.prompt: value["prompt"], plan.completion: value["completion"], plan.label: value["label"]}
            else:
                data = {plan.prompt: value["prompt"],
                        **({plan.responses: value["responses"], plan.scores: value["scores"]} if "responses" in value
                           else {plan.chosen: value["chosen"], plan.rejected: value["rejected"]})}
            rejects.append(reject(int(rows[i]), file, "duplicate_row", detail, data))
        return ~duplicate, rejects
