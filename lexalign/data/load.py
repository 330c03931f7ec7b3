"""Read datasets from files and folders in batches, keeping each row's origin.

Sources: a file or a folder in JSON (an array of records, `{"train": [...]}`
or columns), JSON Lines, CSV/TSV (quoted commas and newlines), Parquet, Arrow
(a `datasets` `save_to_disk` folder), or a Hub dataset snapshot as the
download step lands it (`data/train-00000-of-00001.parquet`, `train.jsonl`, …).
JSON, JSON Lines and CSV/TSV may be compressed (`train.jsonl.gz`, `.bz2`, `.xz`,
`.zst`): they are decompressed as a stream (see `compressed`). Which files make
a split, and a repo's sub-folder (`data_dir`): see `layout`.

Every row keeps its number: the 1-based line (JSON Lines), record (CSV/TSV,
header not counted) or row (others). A row that cannot be read at all comes
back as a reject with that number, never dropped silently.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from lexalign.core.errors import LexAlignError
from lexalign.core.formats import FORMATS, unsupported_format
from lexalign.data import splits as layout
from lexalign.data.common import Piece, reject
from lexalign.data.compressed import compression, inner_suffix, open_text, read_all, read_head
from lexalign.data.jsonl import read_jsonl

_EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
               ".parquet": "parquet", ".arrow": "arrow"}
# Files LexAlign or `datasets` write beside data, and a repo's documents: never read as data.
_RESERVED = {"lineage.json", "report.json", "rejects.jsonl", "dataset_info.json", "dataset_infos.json",
             "dataset_dict.json", "state.json"}
_DOCUMENTS = re.compile(
    r"^(readme|license|licence|citation|notice|changelog)(\..*)?$|\.(md|py|ya?ml|lock|gitattributes)$", re.IGNORECASE
)
BATCH_ROWS = 65_536
_SURROGATE = re.compile("[\ud800-\udfff]")


def _sniff_json(path: Path) -> str:
    """`json` or `jsonl` from the first bytes: an array (or a pretty-printed object), or one object per line.

    A .jsonl file is JSON Lines unless it holds an array; a .json file is JSON
    unless its first line is a whole object.
    """
    head = read_head(path, 1 << 20)
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if inner_suffix(path) != ".json":
        return "json" if text[:1] == b"[" else "jsonl"
    if text[:1] != b"{":
        return "json"
    first = text.split(b"\n", 1)[0]
    try:
        return "jsonl" if isinstance(json.loads(first), dict) else "json"
    except (json.JSONDecodeError, UnicodeDecodeError):
        # `{` alone on a line is a pretty-printed object; a broken first record is still JSON Lines
        return "json" if first.strip() == b"{" else "jsonl"


def detect_format(path: Path, fmt: str = "auto") -> str:
    """The reader for `path`: `fmt` itself, or (auto) from the extension and, for JSON, the content.

    A compressed file's format is the extension under the compression's (`train.jsonl.gz`: JSON Lines).
    """
    if fmt != "auto":
        if fmt not in FORMATS:
            raise unsupported_format(fmt)
        kind = fmt
    else:
        ext = inner_suffix(path)
        if compression(path) and ext not in _EXTENSIONS:
            raise LexAlignError(
                f'Cannot tell the format of the data inside "{path}"',
                f'"{path.name}" is {compression(path)}-compressed; the name does not say what it holds '
                f"(expected e.g. {path.stem}.jsonl{path.suffix})",
                hint="Set the dataset's format (e.g. format: jsonl), or rename the file",
            )
        if ext in (".json", ".jsonl", ".ndjson"):
            return _sniff_json(path) if compression(path) or path.stat().st_size else _EXTENSIONS[ext]
        if ext not in _EXTENSIONS:
            raise unsupported_format(ext.lstrip(".") or path.name)
        kind = _EXTENSIONS[ext]
    if compression(path) and kind in ("parquet", "arrow"):
        raise LexAlignError(
            f'"{path}" is {kind} inside {compression(path)} compression: LexAlign does not read that',
            f"{kind.capitalize()} files compress their columns themselves; compressed JSON, JSON Lines and CSV/TSV "
            "are read as they are",
            hint=f"Decompress it first (the {kind} file is read directly)",
        )
    return kind


def _saved_dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a `datasets` `save_to_disk` folder (one split), in order."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    files = [folder / n for n in names if (folder / n).is_file()]
    return files or sorted(folder.glob("*.arrow"))


def data_files(path: str | Path, split: str, exact: bool = False) -> list[Path]:
    """The data files of `split` under a folder (or the file itself), in order (shards by number).

    A file belongs to a split by its name (`train.jsonl.gz`, `train_prefs-00000-of-00001.parquet`) or a
    folder it sits in (`train/part-0.jsonl`); every shard of a sharded split must be present. A folder
    holding a single data file serves it for any split unless `exact` (an eval split must really exist,
    or it would repeat the training data).
    """
    path = Path(path)
    if path.is_file():
        if exact:
            raise LexAlignError(f'No split "{split}" in "{path}": a single file holds one split',
                                hint="Point dataset.path at a folder with a file per split, or drop eval_split")
        return [path]
    if not path.exists():
        raise LexAlignError(f'Dataset not found at "{path}"',
                            hint="Fix dataset.path, or run: lexalign download --config …")
    if (path / "dataset_dict.json").is_file() and (path / split / "state.json").is_file():
        return _saved_dataset_files(path / split)
    if (path / "state.json").is_file() and not exact:
        return _saved_dataset_files(path)
    candidates = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.name not in _RESERVED and not _DOCUMENTS.search(p.name)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not candidates:
        raise LexAlignError(f'No data files in "{path}"')
    for_split = sorted((p for p in candidates if layout.matches(p, path, split)),
                       key=lambda p: layout.natural_key(p, path))
    if for_split:
        layout.check_shards(for_split, path, split)
        return for_split
    if len(candidates) == 1 and not exact:
        return candidates
    splits = layout.splits_found(candidates, path)
    raise LexAlignError(
        f'No files for split "{split}" in "{path}"',
        "Splits found: " + ", ".join(splits[:30]) + (f" … ({len(splits)} in all)" if len(splits) > 30 else ""),
        "Files found: " + ", ".join(p.relative_to(path).as_posix() for p in candidates[:10])
        + (f" … ({len(candidates)} in all)" if len(candidates) > 10 else ""),
        hint="Set train_split / eval_split to one of the splits found",
    )


# --- readers -------------------------------------------------------------------------------------


def _load_json(path: Path, split: str | None = None) -> list:
    raw = read_all(path).removeprefix(b"\xef\xbb\xbf")
    try:
        data = json.loads(raw.decode("utf-8", "surrogateescape"))  # bad bytes stay visible: undecodable_bytes
    except json.JSONDecodeError as err:
        raise LexAlignError(f'Could not read "{path}" as JSON', f"{err.msg} at line {err.lineno} column {err.colno}",
                            hint="A file of one JSON object per line should be named .jsonl") from None
    except RecursionError:
        raise LexAlignError(f'Could not read "{path}" as JSON', "nested too deeply") from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if split in lists and all(isinstance(r, dict) for r in lists[split][:100]):
            return lists[split]
        records = [v for v in lists.values() if v and all(isinstance(r, dict) for r in v[:100])]
        if len(records) == 1:
            return records[0]
        if lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
            names = list(lists)
            return [dict(zip(names, values, strict=False)) for values in zip(*lists.values(), strict=False)]
        if not lists:
            return [data]
    raise LexAlignError(f'Could not read "{path}" as JSON records',
                        f"Found a JSON {type(data).__name__}; expected an array of objects",
                        hint='Use [{"prompt": …, "chosen": …, "rejected": …}, …] or one object per line (.jsonl)')


def _read_json(path: Path, split: str | None) -> Iterator[Piece]:
    data = _load_json(path, split)
    for start in range(0, len(data), BATCH_ROWS):
        records, rows, bad = [], [], []
        for number, record in enumerate(data[start:start + BATCH_ROWS], start=start + 1):
            if isinstance(record, dict):
                records.append(record)
                rows.append(number)
            else:
                bad.append(reject(number, path.name, "not_an_object", f"a JSON {type(record).__name__}, not an object",
                                  record))
        yield Piece(path.name, np.asarray(rows, dtype=np.int64), records=records, rejects=bad)


def _read_csv(path: Path, delimiter: str) -> Iterator[Piece]:
    import pyarrow as pa

    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open_text(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader, None)
        except csv.Error as err:
            raise LexAlignError(f'Could not read the header of "{path}"', str(err)) from None
        if not header:
            return
        header = _unique_names([name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                                for name in header])
        width = len(header)
        number = 0

        def piece(cells: list[list[str]], rows: list[int], bad: list[dict]) -> Piece:
            columns = list(zip(*cells, strict=False)) if cells else [()] * width
            table = pa.table({name: pa.array(col, type=pa.string())
                              for name, col in zip(header, columns, strict=True)})
            return Piece(path.name, np.asarray(rows, dtype=np.int64), table=table, rejects=bad, text_cells=True)

        cells, rows, bad = [], [], []
        last_error_line = -1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                number += 1
                bad.append(reject(number, path.name, "malformed_row", f"{err} (line {reader.line_num})"))
                if reader.line_num == last_error_line:
                    break  # the reader cannot get past this point
                last_error_line = reader.line_num
                continue
            if not record:
                continue  # a blank line
            number += 1
            if len(record) != width:
                bad.append(reject(number, path.name, "malformed_row",
                                  f"expected {width} fields, found {len(record)} (line {reader.line_num})",
                                  delimiter.join(record)))
            elif any(map(_SURROGATE.search, record)):
                bad.append(reject(number, path.name, "undecodable_bytes", f"invalid UTF-8 (line {reader.line_num})",
                                  delimiter.join(record).encode("utf-8", "surrogateescape").decode("utf-8", "replace")))
            else:
                cells.append(record)
                rows.append(number)
            if len(cells) + len(bad) >= BATCH_ROWS:
                yield piece(cells, rows, bad)
                cells, rows, bad = [], [], []
        if cells or bad:
            yield piece(cells, rows, bad)


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if not count else f"{name}.{count}")
    return out


def _arrow_batches(path: Path, kind: str, columns: list[str] | None, batch_rows: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "parquet":
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        wanted = [c for c in columns if c in names] if columns else None
        wanted = wanted or None
        yield from parquet.iter_batches(batch_size=batch_rows, columns=wanted)
        return
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in reader:
        wanted = [c for c in columns if c in batch.schema.names] if columns else None
        yield batch.select(wanted) if wanted else batch


def _read_arrow(path: Path, kind: str, columns: list[str] | None, batch_rows: int = BATCH_ROWS) -> Iterator[Piece]:
    import pyarrow as pa

    start = 1
    try:
        for batch in _arrow_batches(path, kind, columns, batch_rows):
            table = pa.Table.from_batches([batch])
            for offset in range(0, table.num_rows, batch_rows):
                part = table.slice(offset, batch_rows)
                yield Piece(path.name, np.arange(start, start + part.num_rows, dtype=np.int64), table=part)
                start += part.num_rows
    except (pa.ArrowException, OSError) as err:
        raise LexAlignError(f'Could not read "{path}" as {kind}', str(err).splitlines()[0] if str(err) else "",
                            hint="Is the file complete? Download it again") from None


def iter_pieces(path: Path, kind: str, fields: list[str] | None = None, columns: list[str] | None = None,
                split: str | None = None, label: str | None = None) -> Iterator[Piece]:
    """Batches of one file. `fields`: string fields for the fast JSON Lines path; `columns`: what to read
    from Parquet/Arrow (None: all); `label`: the file's name in rejects (default: its name)."""
    if kind == "jsonl":
        pieces = read_jsonl(path, fields)
    elif kind == "json":
        pieces = _read_json(path, split)
    elif kind in ("csv", "tsv"):
        pieces = _read_csv(path, "\t" if kind == "tsv" else ",")
    elif kind in ("parquet", "arrow"):
        pieces = _read_arrow(path, kind, columns)
    else:  # pragma: no cover - detect_format only returns the kinds above
        raise unsupported_format(kind)
    if not label or label == path.name:
        yield from pieces
        return
    for piece in pieces:
        piece.file = label
        for item in piece.rejects:
            item["file"] = label
        yield piece


def piece_records(piece: Piece) -> list[dict]:
    """A piece's rows as Python dicts; text that is not valid UTF-8 keeps its bytes as surrogate escapes."""
    if piece.records is not None:
        return piece.records
    table = piece.table
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        import pyarrow as pa

        columns = {}
        for name in table.column_names:
            column = table.column(name)
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                raw = column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())
                columns[name] = [None if v is None else v.decode("utf-8", "surrogateescape") for v in raw.to_pylist()]
            else:
                columns[name] = column.to_pylist()
        return [dict(zip(columns, values, strict=False)) for values in zip(*columns.values(), strict=False)]


def sample(path: Path, kind: str, split: str | None = None, n: int = 1000) -> tuple[list[dict], list[str]]:
    """Up to `n` rows from the start of a file, and the field names seen, for deciding its shape."""
    records: list[dict] = []
    names: list[str] = []
    if kind in ("parquet", "arrow"):
        import pyarrow.parquet as pq

        if kind == "parquet":
            try:
                names = pq.ParquetFile(path).schema_arrow.names
            except Exception as err:  # noqa: BLE001 - any unreadable file is a user error
                raise LexAlignError(f'Could not read "{path}" as parquet', str(err).splitlines()[0]) from None
    if kind == "jsonl":
        pieces = read_jsonl(path, None, chunk_bytes=1 << 20)
    elif kind in ("parquet", "arrow"):
        pieces = _read_arrow(path, kind, None, batch_rows=n)
    else:
        pieces = iter_pieces(path, kind, split=split)
    for piece in pieces:
        if piece.table is not None:
            names = names or piece.table.column_names
            piece = Piece(piece.file, piece.rows[:n], table=piece.table.slice(0, n))
        records += piece_records(piece)[: n - len(records)]
        if len(records) >= n:
            break
    pieces.close()
    for record in records:
        names += [k for k in record if k not in names]
    return records, names


def read_records(path: str | Path, fmt: str = "auto", split: str = "train",
                 exact: bool = False) -> tuple[list[dict], list[dict]]:
    """Rows of one split as dicts with `_row` and `_file`, plus rows that could not be parsed
    (`{"_row", "_file", "reason", "detail"}`). `exact`: the split must have files of its own."""
    rows, bad = [], []
    files = data_files(path, split, exact)
    labels = layout.file_labels(files, Path(path))
    for file in files:
        kind = detect_format(file, fmt)
        for piece in iter_pieces(file, kind, split=split, label=labels[file]):
            for number, record in zip(piece.rows.tolist(), piece_records(piece), strict=False):
                rows.append({**record, "_row": number, "_file": piece.file})
            bad += [{"_row": r["row"], "_file": r["file"], "reason": r["reason"], "detail": r["detail"]}
                    for r in piece.rejects]
    return rows, bad
