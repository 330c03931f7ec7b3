"""Shared by the data steps (prepare_sft, validate): reject records, prompt hashing and splits, atomic outputs.

A reject record (one line of `rejects.jsonl`) is
`{"row": N, "file": NAME, "reason": CODE, "detail": TEXT, "data": ORIGINAL}`,
where N is the 1-based line number (JSON Lines) or row/record number (other
formats) in the user's file, so every dropped row can be found again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from lexalign.core.io import atomic_dir, write_json

# Longest text kept in a reject record's `data` (a broken multi-megabyte line is cut, and says so).
MAX_REJECT_TEXT = 100_000

try:  # a dependency of `datasets`, so normally present
    from xxhash import xxh3_64_intdigest as _xxh64
except ImportError:  # pragma: no cover - slower, same guarantees
    def _xxh64(data: bytes, seed: int = 0) -> int:
        key = seed.to_bytes(8, "little")
        return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little")


def reject_record(row: dict, reason: str, detail: str = "") -> dict:
    """A rejects.jsonl entry from a row dict that carries `_row` and `_file` (the SFT data's rows)."""
    original = {k: v for k, v in row.items() if not k.startswith("_")}
    return {"row": row.get("_row"), "file": row.get("_file"), "reason": reason, "detail": detail, "data": original}


def reject(row: int | None, file: str | None, reason: str, detail: str = "", data: Any = None) -> dict:
    """A rejects.jsonl entry: where the row was, why it was dropped, and what it held."""
    if isinstance(data, str) and len(data) > MAX_REJECT_TEXT:
        data = data[:MAX_REJECT_TEXT] + f"… [{len(data) - MAX_REJECT_TEXT} more characters]"
    return {"row": row, "file": file, "reason": reason, "detail": detail, "data": data}


@dataclass
class Piece:
    """A batch of rows as a reader produced them, with their row numbers.

    Exactly one of `table` (pyarrow, for column-wise checks) and `records`
    (Python dicts, for shapes that need per-row work) is set; `rows[i]` is the
    1-based line or row number of row i. `rejects` are rows the reader could
    not parse at all. `text_cells` marks CSV/TSV, where every value is text and
    lists may be JSON-encoded.
    """

    file: str
    rows: np.ndarray
    table: Any = None
    records: list[dict] | None = None
    rejects: list[dict] = field(default_factory=list)
    text_cells: bool = False

    def __len__(self) -> int:
        return len(self.rows)


def hash_strings(values, seed: int = 0, seeds=None) -> np.ndarray:
    """A 64-bit xxh3 hash of each string of a pyarrow string array (or of Python strings).

    `seeds` (one per value) are mixed with `seed`: hashing a joined key with a
    part's length as seed keeps ("a\0b", "c") and ("a", "b\0c") apart.
    """
    import pyarrow as pa

    seed &= (1 << 64) - 1
    seed_values = repeat(seed) if seeds is None else \
        (np.asarray(seeds).astype(np.uint64) ^ np.uint64(seed)).tolist()
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        objects = values.cast(pa.binary()).to_pylist()  # bytes objects: the fastest way out of arrow
    else:
        objects = [v.encode("utf-8", "surrogatepass") for v in values]
    return np.fromiter(map(_xxh64, objects, seed_values), dtype=np.uint64, count=len(objects))


def eval_threshold(fraction: float) -> np.uint64:
    """Prompts whose hash is below this go to eval: `fraction` of all prompts, decided by the prompt alone."""
    return np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))


def in_eval_split(prompt: str, fraction: float, seed: int) -> bool:
    """Deterministic by prompt, so every row of one prompt lands on the same side (SFT data)."""
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def write_split_outputs(out_dir: str | Path, result: dict, lineage: dict | None = None) -> None:
    """Write train.parquet, eval.parquet, rejects.jsonl, report.json (and lineage.json) into one folder, atomically."""
    with atomic_dir(out_dir) as tmp:
        result["train"].to_parquet(tmp / "train.parquet", index=False)
        result["eval"].to_parquet(tmp / "eval.parquet", index=False)
        with (tmp / "rejects.jsonl").open("w", encoding="utf-8") as handle:
            for item in result["rejects"]:
                handle.write(dumps_reject(item) + "\n")
        write_json(tmp / "report.json", result["report"])
        if lineage:
            write_json(tmp / "lineage.json", lineage)


def dumps_reject(item: dict) -> str:
    """One rejects.jsonl line; text that is not valid Unicode is escaped rather than lost."""
    line = json.dumps(item, default=str, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (undecodable bytes): \udcff escapes keep them visible
        line = json.dumps(item, default=str)
    return line
