"""Where validated rows go: frames in memory, or Parquet and JSON Lines written batch by batch.

Every output row has `prompt`, `chosen`, `rejected` (strings), `responses`
(list of strings, best first), `scores` (list of floats, non-increasing; equal
means tied) and `source_row` (int). Pairs get `[chosen, rejected]` and
`[1.0, 0.0]`, so DPO and GDPO read one schema. Rankings built from pairs add
`source_rows`, every input row of the group. Unpaired rows (KTO) have their own
schema: `prompt`, `completion`, `label` (bool: desirable) and `source_row`.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np

from lexalign.data.common import dumps_reject


def output_schema(grouped: bool = False, unpaired: bool = False):
    import pyarrow as pa

    if unpaired:
        return pa.schema([("prompt", pa.string()), ("completion", pa.string()), ("label", pa.bool_()),
                          ("source_row", pa.int64())])
    fields = [("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
              ("responses", pa.list_(pa.string())), ("scores", pa.list_(pa.float64())), ("source_row", pa.int64())]
    if grouped:
        fields.append(("source_rows", pa.list_(pa.int64())))
    return pa.schema(fields)


def _pair_lists(chosen, rejected):
    """`responses` = [chosen, rejected] and `scores` = [1.0, 0.0] for every row, copying the text once.

    Joining chosen and rejected row by row lays the text out exactly as the
    list values need it (c0 r0 c1 r1 …); the value offsets split each joined
    string after its chosen part.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(chosen)
    joined = pc.binary_join_element_wise(chosen, rejected, "")
    ends = np.frombuffer(joined.buffers()[1], dtype=np.int32, count=n + 1, offset=joined.offset * 4)
    split = np.empty(2 * n + 1, dtype=np.int32)
    split[0::2] = ends
    split[1::2] = ends[:-1] + np.frombuffer(chosen.buffers()[1], dtype=np.int32, count=n + 1,
                                            offset=chosen.offset * 4)[1:] \
        - np.frombuffer(chosen.buffers()[1], dtype=np.int32, count=n + 1, offset=chosen.offset * 4)[:-1]
    values = pa.StringArray.from_buffers(2 * n, pa.py_buffer(split), joined.buffers()[2])
    offsets = pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32))
    scores = pa.array(np.tile(np.array([1.0, 0.0]), n))
    return pa.ListArray.from_arrays(offsets, values), pa.ListArray.from_arrays(offsets, scores)


def to_output(table, grouped: bool = False):
    """A canonical table in the output schema."""
    import pyarrow as pa

    if "label" in table.column_names:
        columns = [table.column(name) for name in ("prompt", "completion", "label", "_row")]
        return pa.Table.from_arrays(columns, schema=output_schema(unpaired=True))
    chosen = table.column("chosen").combine_chunks()
    rejected = table.column("rejected").combine_chunks()
    if "responses" in table.column_names:
        responses, scores = table.column("responses"), table.column("scores")
    else:
        responses, scores = _pair_lists(chosen, rejected)
    columns = [table.column("prompt"), chosen, rejected, responses, scores, table.column("_row")]
    if grouped:
        columns.append(table.column("source_rows"))
    return pa.Table.from_arrays(columns, schema=output_schema(grouped))


class MemorySink:
    """Collects everything; `frames()` gives the train and eval DataFrames."""

    def __init__(self, grouped: bool = False, unpaired: bool = False):
        self.grouped = grouped
        self.unpaired = unpaired
        self.tables: dict[str, list] = {"train": [], "eval": []}
        self.rejects: list[dict] = []

    def write(self, split: str, table) -> None:
        if table.num_rows:
            self.tables[split].append(to_output(table, self.grouped))

    def reject(self, records: list[dict]) -> None:
        self.rejects += records

    def table(self, split: str):
        import pyarrow as pa

        tables = self.tables[split]
        return pa.concat_tables(tables) if tables else output_schema(self.grouped, self.unpaired).empty_table()

    def frames(self) -> dict:
        return {split: self.table(split).to_pandas() for split in ("train", "eval")}


class ParquetSink:
    """Writes train.parquet, eval.parquet and rejects.jsonl into a folder as batches arrive.

    Parquet encoding runs on a background thread (pyarrow releases the GIL),
    at most a few batches behind, so memory stays bounded.
    """

    def __init__(self, folder: str | Path, grouped: bool = False, unpaired: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self.folder = Path(folder)
        self.grouped = grouped
        self.unpaired = unpaired
        self.writers: dict = {}
        self.rejects = (self.folder / "rejects.jsonl").open("w", encoding="utf-8")
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="lexalign-parquet")
        self.pending: deque = deque()

    def _writer(self, split: str):
        import pyarrow.parquet as pq

        if split not in self.writers:
            self.writers[split] = pq.ParquetWriter(self.folder / f"{split}.parquet",
                                                   output_schema(self.grouped, self.unpaired),
                                                   compression="snappy", use_dictionary=False,
                                                   write_statistics=["source_row"])
        return self.writers[split]

    def write(self, split: str, table) -> None:
        if table.num_rows:
            writer = self._writer(split)
            self.pending.append(self.pool.submit(writer.write_table, to_output(table, self.grouped)))
            while len(self.pending) > 4:
                self.pending.popleft().result()

    def reject(self, records: list[dict]) -> None:
        self.rejects.writelines(dumps_reject(r) + "\n" for r in records)

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown()
            for split in ("train", "eval"):
                self._writer(split).close()
            self.rejects.close()
