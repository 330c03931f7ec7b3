"""Fuzzed: random rows and broken files never give a traceback; every row is kept or rejected with a reason."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from fixtures.data.helpers import accounted, pairs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lexalign.config.sections import DatasetConfig
from lexalign.core.errors import LexAlignError
from lexalign.data.validation import validate_preferences

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

texts = st.one_of(st.text(max_size=30), st.sampled_from(["", " ", "\n\t", "same", "Hello", "\x00", "\ud800x"]))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]),
                                           "content": texts}), max_size=4)
values = st.one_of(texts, texts, st.none(), st.integers(), st.floats(allow_nan=True), st.booleans(), messages,
                   st.lists(texts, max_size=4), st.dictionaries(st.text(max_size=5), texts, max_size=2))
rows = st.lists(
    st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "responses", "scores", "meta"]), values),
    min_size=1, max_size=25,
)
garbage = st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"{", b"[1]", b'"x"', b"\xff\xfe",
                                                                     b"{} {}", b"null", b"   "])),
                   max_size=8)


def _validate(path: Path, tokenizer=None, **overrides) -> None:
    try:
        result = validate_preferences(DatasetConfig(path=str(path), **overrides), tokenizer)
    except LexAlignError as err:  # a message for the user, never a traceback
        assert err.render().startswith("Error: ")
        return
    accounted(result)


def _write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@FUZZ
@given(rows=rows, group_size=st.sampled_from([None, 2, 3]))
def test_random_rows(rows, group_size):
    with tempfile.TemporaryDirectory() as tmp:
        lines = [json.dumps(r).encode() for r in rows]
        _validate(_write_lines(Path(tmp) / "train.jsonl", lines), group_size=group_size, eval_fraction=0.3)


@FUZZ
@given(rows=rows)
def test_random_rows_with_a_tokenizer(rows, demo_tokenizer):
    with tempfile.TemporaryDirectory() as tmp:
        lines = [json.dumps(r).encode() for r in rows]
        _validate(_write_lines(Path(tmp) / "train.jsonl", lines), demo_tokenizer, max_length=24,
                  length_policy="truncate")


@FUZZ
@given(junk=garbage, positions=st.lists(st.integers(0, 30), max_size=8), cut=st.integers(0, 5000))
def test_broken_jsonl(junk, positions, cut):
    lines = [json.dumps(r).encode() for r in pairs(30)]
    for line, at in zip(junk, positions, strict=False):
        lines.insert(at, line)
    data = b"\n".join(lines)[: len(b"\n".join(lines)) - cut]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_bytes(data)
        _validate(path)


@FUZZ
@given(data=st.binary(max_size=300), kind=st.sampled_from(["json", "csv", "tsv", "jsonl", "parquet"]))
def test_random_bytes_in_any_format(data, kind):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"train.{kind}"
        path.write_bytes(data)
        _validate(path)


@FUZZ
@given(cells=st.lists(st.lists(st.text(max_size=12), min_size=1, max_size=4), max_size=12),
       delimiter=st.sampled_from([",", "\t"]))
def test_random_csv(cells, delimiter):
    header = delimiter.join(["prompt", "chosen", "rejected"])
    body = "\n".join(delimiter.join(json.dumps(c) if i % 2 else c for i, c in enumerate(row)) for row in cells)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("train.csv" if delimiter == "," else "train.tsv")
        path.write_text(header + "\n" + body + "\n", encoding="utf-8", errors="surrogateescape")
        _validate(path)


@FUZZ
@given(junk=garbage, positions=st.lists(st.integers(0, 30), max_size=8), chunk_bytes=st.integers(16, 4096))
def test_fast_and_python_readers_agree(junk, positions, chunk_bytes):
    """The pyarrow path reads exactly the rows, line numbers and rejects that json.loads line by line does."""
    from lexalign.data.jsonl import read_jsonl
    from lexalign.data.load import piece_records

    lines = [json.dumps(r).encode() for r in pairs(30)]
    for line, at in zip(junk, positions, strict=False):
        lines.insert(at, line)
    fields = ["prompt", "chosen", "rejected"]
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_lines(Path(tmp) / "train.jsonl", lines)

        def read(wanted):
            rows, bad = {}, {}
            for piece in read_jsonl(path, wanted, chunk_bytes=chunk_bytes, workers=2):
                for number, record in zip(piece.rows.tolist(), piece_records(piece), strict=True):
                    rows[number] = {k: record.get(k) for k in fields}
                bad.update({r["row"]: r["reason"] for r in piece.rejects})
            return rows, bad

        assert read(fields) == read(None)
