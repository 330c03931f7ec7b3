"""Row checks: every dropped row has a reason code, its row or line number and what it held."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from fixtures.data.helpers import pair, pairs, run, write_jsonl

from lexalign.config.sections import DatasetConfig
from lexalign.core.errors import LexAlignError
from lexalign.data import jsonl
from lexalign.data.load import piece_records
from lexalign.data.validation import validate_preferences


def _reasons(result) -> dict[int, str]:
    return {r["row"]: r["reason"] for r in result["rejects"]}


def test_every_field_check(tmp_path):
    rows = pairs(10) + [
        {"prompt": None, "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": " \n\t"},
        {"prompt": "p", "chosen": 3, "rejected": "b"},
        {"prompt": "p", "chosen": {"text": "a"}, "rejected": "b"},
        {"prompt": "p", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        pair(2),
        pair(3) | {"meta": "other metadata, same pair"},
        {"prompt": ["not", "messages"], "chosen": "a", "rejected": "b"},
    ]
    result = run(write_jsonl(tmp_path / "train.jsonl", rows))
    assert _reasons(result) == {11: "null_field", 12: "empty_field", 13: "empty_field", 14: "non_string_field",
                                15: "non_string_field", 16: "missing_field", 17: "chosen_equals_rejected",
                                18: "duplicate_row", 19: "duplicate_row", 20: "non_string_field"}
    by_row = {r["row"]: r for r in result["rejects"]}
    assert by_row[13]["detail"] == "rejected is whitespace only"
    assert by_row[18]["detail"] == "same as row 3"
    assert by_row[16]["data"] == {"prompt": "p", "rejected": "b"}


def test_unparseable_lines_keep_their_numbers(tmp_path):
    lines = [json.dumps(r) for r in pairs(5)]
    lines[1] = '{"prompt": "p", "chosen": "a", "rejected": '
    lines.insert(3, "")
    lines.insert(4, "   ")
    lines.append('["a", "list"]')
    lines.append('{"prompt": "p1", "chosen": "a", "rejected": "b"} {"prompt": "p2", "chosen": "a", "rejected": "b"}')
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with path.open("ab") as handle:
        handle.write(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
        handle.write(b'{"prompt": "lone \\ud800 surrogate", "chosen": "a", "rejected": "b"}')
    result = run(path)
    assert _reasons(result) == {2: "unparseable_json", 8: "not_an_object", 9: "unparseable_json",
                                10: "undecodable_bytes", 11: "undecodable_bytes"}
    assert result["report"]["input_rows"] == 9 + 2 - 2  # blank lines are not rows
    frame = pd.concat([result["train"], result["eval"]])
    assert sorted(frame["source_row"]) == [1, 3, 6, 7]


def test_invalid_utf8_inside_a_parsed_chunk(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", pairs(30))
    with path.open("ab") as handle:
        handle.write(b'{"prompt": "ok", "chosen": "bad \xff byte", "rejected": "b", "meta": "\xfe"}\n')
    result = run(path)
    assert _reasons(result) == {31: "undecodable_bytes"}
    assert result["rejects"][0]["detail"] == "chosen holds bytes that are not valid UTF-8"


@pytest.mark.parametrize("chunk_bytes", [64, 300, 4096])
def test_chunks_fast_and_python_paths_agree(tmp_path, chunk_bytes, monkeypatch):
    """Tiny chunks force every boundary case; the pyarrow path must see exactly what Python sees."""
    rng = np.random.default_rng(chunk_bytes)
    lines = []
    for _ in range(300):
        kind = rng.integers(0, 12)
        row = pair(int(rng.integers(0, 150)))
        if kind == 0:
            lines.append("{broken")
        elif kind == 1:
            lines.append("")
        elif kind == 2:
            lines.append(json.dumps(row | {"chosen": None}))
        elif kind == 3:
            lines.append(json.dumps({k: v for k, v in row.items() if k != "rejected"}))
        elif kind == 4:
            lines.append(json.dumps(row | {"chosen": 1.5}))
        elif kind == 5:
            lines.append(json.dumps(row | {"prompt": "x" * 500}))
        else:
            lines.append(json.dumps(row))
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    monkeypatch.setattr(jsonl, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(jsonl, "PIECE_LINES", 7)

    def collect(fields):
        rows, bad = {}, {}
        for piece in jsonl.read_jsonl(path, fields, chunk_bytes=chunk_bytes, workers=2):
            for number, record in zip(piece.rows.tolist(), piece_records(piece), strict=False):
                rows[number] = {k: record.get(k) for k in ("prompt", "chosen", "rejected")}
            bad.update({r["row"]: r["reason"] for r in piece.rejects})
        return rows, bad

    fast_rows, fast_bad = collect(["prompt", "chosen", "rejected"])
    slow_rows, slow_bad = collect(None)
    assert fast_bad == slow_bad
    assert fast_rows.keys() == slow_rows.keys()
    for number, values in fast_rows.items():  # python rows may keep non-string values the fast path leaves out
        assert values == slow_rows[number] or None in values.values() or 1.5 in slow_rows[number].values()
    assert len(fast_rows) + len(fast_bad) == sum(1 for line in lines if line.strip())
    run(path)


def test_length_policy_drop_reports_the_share(tmp_path, demo_tokenizer):
    rows = pairs(10) + [pair(50) | {"chosen": "word " * 200}]
    result = run(write_jsonl(tmp_path / "train.jsonl", rows), demo_tokenizer, max_length=64)
    assert _reasons(result) == {11: "too_long"}
    lengths = result["report"]["lengths"]
    assert lengths["over_max_length"] == 1 and lengths["over_max_length_share"] == pytest.approx(1 / 11)
    assert lengths["tokens"]["max"] > 64 and lengths["tokens"]["p50"] < 64
    assert "max_length 64" in result["rejects"][0]["detail"]


def test_length_is_what_the_trainer_sees(tmp_path, demo_tokenizer):
    row = pair(1)
    result = run(write_jsonl(tmp_path / "train.jsonl", [row]), demo_tokenizer)
    expected = max(len(demo_tokenizer(row["prompt"] + row[k])["input_ids"]) + 1 for k in ("chosen", "rejected"))
    assert result["report"]["lengths"]["tokens"]["max"] == expected


def test_length_policy_truncate(tmp_path, demo_tokenizer):
    rows = pairs(5) + [pair(50) | {"chosen": "Hello there " * 100, "rejected": "Go away " * 100},
                       pair(51) | {"prompt": "Please greet " * 100},
                       pair(52) | {"chosen": "Hello " * 100 + "A", "rejected": "Hello " * 100 + "B"}]
    result = run(write_jsonl(tmp_path / "train.jsonl", rows), demo_tokenizer, max_length=40,
                 length_policy="truncate")
    assert _reasons(result) == {7: "prompt_too_long", 8: "identical_after_truncation"}
    frame = pd.concat([result["train"], result["eval"]])
    cut = frame[frame["source_row"] == 6].iloc[0]
    assert cut["chosen"].startswith("Hello there") and len(cut["chosen"]) < 300
    assert len(demo_tokenizer(cut["prompt"] + cut["chosen"])["input_ids"]) + 1 <= 40 + 1
    assert result["report"]["lengths"]["truncated"] == 1


def test_length_policy_fail(tmp_path, demo_tokenizer):
    rows = pairs(9) + [pair(50) | {"chosen": "word " * 200}]
    with pytest.raises(LexAlignError) as err:
        run(write_jsonl(tmp_path / "train.jsonl", rows), demo_tokenizer, max_length=64, length_policy="fail")
    text = err.value.render()
    assert "1 of 10 rows (10.0%) are longer than max_length 64" in text and "row 10 of train.jsonl" in text


def test_prompt_leaking_into_the_eval_split(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", pairs(10))
    write_jsonl(tmp_path / "d" / "test.jsonl", [pair(1) | {"chosen": "another answer"}] + pairs(3, start=20)
                + [pair(5)])
    result = run(tmp_path / "d", eval_split="test")
    rejects = {(r["file"], r["row"]): r["reason"] for r in result["rejects"]}
    assert rejects == {("test.jsonl", 1): "prompt_in_train_and_eval", ("test.jsonl", 5): "duplicate_row"}
    assert result["report"]["eval_rows"] == 3


def test_split_by_prompt_is_deterministic(tmp_path):
    rows = [pair(i % 40) | {"chosen": f"answer {i}"} for i in range(400)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    first, second = run(path, eval_fraction=0.25), run(path, eval_fraction=0.25)
    assert first["eval"]["source_row"].tolist() == second["eval"]["source_row"].tolist()
    assert 0.1 < len(first["eval"]) / 400 < 0.45
    other = validate_preferences(DatasetConfig(path=str(path), eval_fraction=0.25), None, seed=7)
    assert other["eval"]["source_row"].tolist() != first["eval"]["source_row"].tolist()


def test_two_objects_on_a_line_beside_a_blank_line(tmp_path):
    """One line too many objects and one line none: the counts agree, the line numbers must not drift."""
    lines = [json.dumps(pair(1)) + " " + json.dumps(pair(2)), "", json.dumps(pair(3))]
    result = run(write_jsonl(tmp_path / "train.jsonl", lines))
    assert _reasons(result) == {1: "unparseable_json"}
    assert pd.concat([result["train"], result["eval"]])["source_row"].tolist() == [3]
