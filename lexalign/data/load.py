"""Read datasets from files and folders, keeping each row's origin.

Every record comes back with `_row`: its 1-based line number (JSONL) or row
index (others), so a rejected row can be found in the user's file. Lines that
cannot be parsed are returned as rejects, never dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lexalign.errors import LexAlignError

FORMATS = ("auto", "json", "jsonl", "csv", "tsv", "parquet")
_EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
# Files LexAlign writes beside data; never read as data.
_RESERVED = {"lineage.json", "report.json", "rejects.jsonl"}


def _unsupported(fmt: str) -> LexAlignError:
    return LexAlignError(
        f'Unsupported dataset format "{fmt}"',
        f"Supported formats: {', '.join(FORMATS)}",
        hint="Convert it, e.g. pandas.read_fwf(path).to_json('data.jsonl', orient='records', lines=True)",
    )


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise _unsupported(fmt)
        return fmt
    ext = path.suffix.lower()
    if ext in _EXTENSIONS:
        if ext == ".json":  # JSON Lines are often saved as .json: look at the content
            with path.open("rb") as handle:
                head = handle.read(1 << 16).lstrip()
            if head[:1] == b"{" and b"\n{" in head.replace(b"\r\n", b"\n"):
                return "jsonl"
        return _EXTENSIONS[ext]
    raise _unsupported(ext.lstrip(".") or path.name)


def data_files(path: Path, split: str) -> list[Path]:
    """The data files of `split` under a folder (or the file itself)."""
    if path.is_file():
        return [path]
    if not path.exists():
        raise LexAlignError(f'Dataset not found at "{path}"', hint="Fix dataset.path, or run: lexalign download --config …")
    candidates = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.name not in _RESERVED and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not candidates:
        raise LexAlignError(f'No data files in "{path}"')
    for_split = [p for p in candidates if p.stem == split or p.stem.startswith(f"{split}-") or p.parent.name == split]
    if for_split:
        return for_split
    if len(candidates) == 1:
        return candidates
    raise LexAlignError(
        f'No files for split "{split}" in "{path}"',
        "Files found: " + ", ".join(p.relative_to(path).as_posix() for p in candidates[:10]),
        hint="Set dataset.train_split to one of the file names (without extension)",
    )


def _read_jsonl(path: Path) -> tuple[list[dict], list[dict]]:
    rows, bad = [], []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                bad.append({"_row": number, "_file": path.name, "reason": "undecodable_bytes", "detail": str(err)})
                continue
            except json.JSONDecodeError as err:
                bad.append({"_row": number, "_file": path.name, "reason": "unparseable_json", "detail": err.msg})
                continue
            if not isinstance(record, dict):
                bad.append({"_row": number, "_file": path.name, "reason": "not_an_object", "detail": type(record).__name__})
                continue
            record["_row"] = number
            rows.append(record)
    return rows, bad


def _read_frame(path: Path, fmt: str) -> list[dict]:
    try:
        if fmt == "json":
            with path.open(encoding="utf-8") as handle:
                data = json.load(handle)
            if isinstance(data, dict):  # {"train": [...]} or column-oriented {"prompt": [...], ...}
                data = next((v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict)), None) \
                    or pd.DataFrame(data).to_dict("records")
            frame = pd.DataFrame(data)
        elif fmt in ("csv", "tsv"):
            frame = pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False, na_values=[])
        else:
            frame = pd.read_parquet(path)
    except (ValueError, OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LexAlignError(f'Could not read "{path}" as {fmt}', str(err).splitlines()[0]) from None
    records = frame.to_dict("records")
    for index, record in enumerate(records, start=1):
        record["_row"] = index
    return records


def read_records(path: str | Path, fmt: str = "auto", split: str = "train") -> tuple[list[dict], list[dict]]:
    """Rows of one split as dicts with `_row` and `_file`, plus rows that could not be parsed."""
    path = Path(path)
    rows, bad = [], []
    for file in data_files(path, split):
        kind = detect_format(file, fmt)
        if kind == "jsonl":
            good, broken = _read_jsonl(file)
        else:
            good, broken = _read_frame(file, kind), []
        for record in good:
            record["_file"] = file.name
        rows += good
        bad += broken
    return rows, bad
