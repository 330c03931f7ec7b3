"""JSON Lines, fast and exact: pyarrow parses chunks in worker threads, Python covers what it cannot.

The file is cut into chunks of whole lines. With `fields` given (string
columns wanted), pyarrow parses each chunk into a table of those fields; the
chunk is trusted only when it yields exactly one row per non-blank line, so
row i maps back to its line number. A chunk that fails (a broken line, a value
of another type, two objects on a line) is re-parsed in pieces of a few hundred
lines, and pieces that still fail go through `json.loads` line by line, where
each bad line becomes a reject with its number: `unparseable_json`,
`undecodable_bytes` or `not_an_object`. Rows with a null in a wanted field are
re-read in Python too, so a missing key and a null are told apart.

Without `fields`, every chunk is parsed line by line in Python (for shapes
that need nested values: messages, ranked completions).
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from lexalign.data.common import Piece, reject
from lexalign.data.compressed import compression, open_binary

CHUNK_BYTES = 8 << 20
PIECE_LINES = 256
_BOM = b"\xef\xbb\xbf"


def _stream_chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    """Whole-line chunks of a compressed file, decompressed a chunk at a time.

    A stream cannot seek back, so the part after a chunk's last newline is carried
    into the next one (and a line longer than a chunk grows until its newline).
    """
    with open_binary(path) as handle:
        buffer = b""
        data = handle.read(chunk_bytes).removeprefix(_BOM)
        while data:
            buffer = buffer + data if buffer else data
            cut = buffer.rfind(b"\n") + 1
            if cut == len(buffer):
                yield buffer
                buffer = b""
            elif cut:
                chunk, buffer = memoryview(buffer)[:cut], buffer[cut:]
                yield chunk
            data = handle.read(chunk_bytes)
        if buffer:
            yield buffer  # the last line, without its newline


def _chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    """Whole-line chunks of the file (a chunk ends after its last newline, or at the end of the file).

    Each read is cut after its last newline and the next read starts there, so
    nothing is copied to join pieces (unless one line is longer than a chunk).
    """
    if compression(path):
        yield from _stream_chunks(path, chunk_bytes)
        return
    with path.open("rb") as handle:
        if handle.read(len(_BOM)) != _BOM:
            handle.seek(0)
        while True:
            start = handle.tell()
            data = handle.read(chunk_bytes)
            if not data:
                return
            cut = data.rfind(b"\n") + 1
            while cut == 0 and len(data) % chunk_bytes == 0:  # one line longer than a chunk
                more = handle.read(chunk_bytes)
                if not more:
                    break
                data += more
                cut = data.rfind(b"\n") + 1
            if cut == 0 or cut == len(data):
                yield data
            else:
                handle.seek(start + cut)
                yield memoryview(data)[:cut]


def _count_lines(chunk) -> int:
    """Lines in a chunk (the last may lack its newline), counted without holding the GIL for long."""
    data = np.frombuffer(chunk, dtype=np.uint8)
    return int(np.count_nonzero(data == 10)) + int(data[-1] != 10)


def _lines_opening_objects(chunk) -> int:
    """Lines whose first byte is `{`: when that is every line, none is blank and each holds >= 1 object."""
    data = np.frombuffer(chunk, dtype=np.uint8)
    return int(np.count_nonzero((data[:-1] == 10) & (data[1:] == 123))) + int(data[0] == 123)


def _first_solid(data) -> int | None:
    """The first byte that is not whitespace, or None."""
    view = np.frombuffer(data, dtype=np.uint8)
    for start in range(0, len(view), 4096):
        block = view[start:start + 4096]
        solid = np.flatnonzero((block != 32) & (block != 9) & (block != 13) & (block != 10))
        if len(solid):
            return int(block[solid[0]])
    return None


def _line_bounds(chunk: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive, without the newline) byte offsets of every line."""
    data = np.frombuffer(chunk, dtype=np.uint8)
    newlines = np.flatnonzero(data == 10)
    ends = newlines if data[-1] == 10 else np.append(newlines, len(data))
    starts = np.concatenate(([0], newlines[: len(ends) - 1] + 1))
    return starts, ends


def _non_blank(chunk: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Lines holding anything but spaces, tabs and carriage returns."""
    data = np.frombuffer(chunk, dtype=np.uint8)
    solid = ~((data == 32) | (data == 9) | (data == 13) | (data == 10))
    counts = np.concatenate(([0], np.cumsum(solid, dtype=np.int64)))
    return (counts[ends] - counts[starts]) > 0


def _python_lines(lines: list[bytes], numbers: list[int], file: str) -> Piece:
    """Parse lines one by one; every non-blank line is a record or a reject."""
    records, rows, bad = [], [], []
    for number, raw in zip(numbers, lines, strict=False):
        raw = raw.strip()
        if not raw:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.append(reject(number, file, "undecodable_bytes", f"invalid UTF-8 at byte {err.start}",
                              raw.decode("utf-8", "replace")))
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            bad.append(reject(number, file, "unparseable_json", f"{err.msg} at column {err.colno}", text))
            continue
        except RecursionError:
            bad.append(reject(number, file, "unparseable_json", "nested too deeply", text))
            continue
        if not isinstance(record, dict):
            bad.append(reject(number, file, "not_an_object", f"a JSON {type(record).__name__}, not an object", text))
            continue
        records.append(record)
        rows.append(number)
    return Piece(file, np.asarray(rows, dtype=np.int64), records=records, rejects=bad)


def _python_chunk(chunk, first_line: int, file: str) -> Piece:
    lines = bytes(chunk).split(b"\n")
    if not lines[-1]:
        lines.pop()
    return _python_lines(lines, list(range(first_line, first_line + len(lines))), file)


class _Parser:
    """Runs in worker threads: one chunk in, pieces out, with line numbers counted from 1 in the chunk."""

    def __init__(self, fields: list[str], file: str):
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.json as pj

        self.pa, self.pc, self.pj = pa, pc, pj
        self.fields = fields
        self.file = file
        self.parse_options = pj.ParseOptions(
            explicit_schema=pa.schema([(f, pa.string()) for f in fields]), unexpected_field_behavior="ignore"
        )

    def arrow(self, data):
        """A table of the wanted fields, or None where pyarrow cannot parse `data`."""
        if _first_solid(data) != 123:  # pyarrow 26 crashes on data starting with a top-level `null`: `{` only
            return None
        options = self.pj.ReadOptions(use_threads=False, block_size=max(len(data) + 1, 1 << 16))
        try:
            return self.pj.read_json(self.pa.BufferReader(self.pa.py_buffer(data)), read_options=options,
                                     parse_options=self.parse_options)
        except (self.pa.ArrowInvalid, self.pa.ArrowNotImplementedError, OverflowError):
            return None

    def chunk(self, chunk) -> tuple[list[Piece], int]:
        lines = _count_lines(chunk)
        table = self.arrow(chunk)
        if table is not None and table.num_rows == lines == _lines_opening_objects(chunk):
            return self._finish(table, np.arange(1, lines + 1, dtype=np.int64), chunk, None), lines
        starts, ends = _line_bounds(chunk)
        solid = _non_blank(chunk, starts, ends)
        bounds = (starts, ends)
        if table is not None and table.num_rows == int(solid.sum()):
            return self._finish(table, 1 + np.flatnonzero(solid), chunk, bounds), lines
        pieces = []
        for a in range(0, len(starts), PIECE_LINES):
            b = min(a + PIECE_LINES, len(starts))
            table = self.arrow(chunk[starts[a]:ends[b - 1]]) if solid[a:b].any() else None
            if table is not None and table.num_rows == int(solid[a:b].sum()):
                pieces += self._finish(table, 1 + a + np.flatnonzero(solid[a:b]), chunk, bounds)
            else:
                pieces.append(_python_lines([bytes(chunk[s:e]) for s, e in zip(starts[a:b], ends[a:b], strict=False)],
                                            list(range(1 + a, 1 + b)), self.file))
        return pieces, lines

    def _finish(self, table, rows: np.ndarray, chunk, bounds) -> list[Piece]:
        """Hand rows with a null in a wanted field to Python: was the key missing, or null?"""
        rows = rows.astype(np.int64)
        if not any(table.column(f).null_count for f in self.fields):
            return [Piece(self.file, rows, table=table)]
        null = np.zeros(table.num_rows, dtype=bool)
        for f in self.fields:
            null |= self.pc.is_null(table.column(f)).to_numpy(zero_copy_only=False)
        starts, ends = bounds if bounds is not None else _line_bounds(chunk)
        index = rows[null] - 1
        python = _python_lines([bytes(chunk[starts[i]:ends[i]]) for i in index], rows[null].tolist(), self.file)
        keep = ~null
        return [Piece(self.file, rows[keep], table=table.filter(keep)), python]


def _shift(pieces: list[Piece], offset: int) -> list[Piece]:
    """Chunk-relative line numbers to file line numbers."""
    for piece in pieces:
        piece.rows = piece.rows + offset
        for item in piece.rejects:
            item["row"] += offset
    return pieces


def read_jsonl(path: str | Path, fields: list[str] | None = None, chunk_bytes: int | None = None,
               workers: int | None = None) -> Iterator[Piece]:
    """Pieces of a JSON Lines file in order; see the module docstring.

    Chunks are CHUNK_BYTES, or smaller for a small file, so that every worker has several.
    """
    path = Path(path)
    file = path.name
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if chunk_bytes is None:
        chunk_bytes = int(min(CHUNK_BYTES, max(1 << 20, path.stat().st_size // (4 * workers))))
    if not fields:
        line = 1
        for chunk in _chunks(path, chunk_bytes):
            yield _python_chunk(chunk, line, file)
            line += _count_lines(chunk)
        return
    parser = _Parser(list(fields), file)
    offset = 0
    with ThreadPoolExecutor(workers, thread_name_prefix="lexalign-jsonl") as pool:
        pending: deque = deque()
        chunks = _chunks(path, chunk_bytes)
        for chunk in chunks:
            pending.append(pool.submit(parser.chunk, chunk))
            while len(pending) > 2 * workers:
                pieces, lines = pending.popleft().result()
                yield from _shift(pieces, offset)
                offset += lines
        while pending:
            pieces, lines = pending.popleft().result()
            yield from _shift(pieces, offset)
            offset += lines
