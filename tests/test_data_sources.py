"""Preference data sources: every common file and folder layout in, one validated shape out."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest
from fixtures.data.helpers import pair, pairs, run, write_jsonl

from lexalign.config.sections import DatasetConfig
from lexalign.core.errors import LexAlignError
from lexalign.data.load import data_files, detect_format, read_records


def _texts(result) -> set[tuple[str, str, str]]:
    frame = pd.concat([result["train"], result["eval"]])
    return set(zip(frame["prompt"], frame["chosen"], frame["rejected"], strict=False))


EXPECTED = {(r["prompt"], r["chosen"], r["rejected"]) for r in pairs(20)}


def test_jsonl(tmp_path):
    result = run(write_jsonl(tmp_path / "train.jsonl", pairs(20)))
    assert _texts(result) == EXPECTED
    assert result["report"]["shape"] == "pairs"
    assert sorted(pd.concat([result["train"], result["eval"]])["source_row"]) == list(range(1, 21))


@pytest.mark.parametrize("layout", ["array", "split_key", "columns"])
def test_json(tmp_path, layout):
    rows = pairs(20)
    data = {"array": rows, "split_key": {"train": rows, "version": 2},
            "columns": {k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}}[layout]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(data, indent=2))
    assert detect_format(path) == "json"
    assert _texts(run(path)) == EXPECTED


def test_json_lines_named_json_are_detected(tmp_path):
    path = write_jsonl(tmp_path / "prefs.json", pairs(20))
    assert detect_format(path) == "jsonl"
    assert _texts(run(path)) == EXPECTED


def test_csv_with_quoted_newlines_and_commas(tmp_path):
    rows = pairs(18) + [
        {"prompt": "Say, in two lines:\nhello", "chosen": "Hello,\nworld", "rejected": "no"},
        {"prompt": 'Quote "this"', "chosen": 'He said "hi", twice', "rejected": "nothing, really"},
    ]
    path = tmp_path / "prefs.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["prompt", "chosen", "rejected", "meta"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    result = run(path)
    assert _texts(result) == {(r["prompt"], r["chosen"], r["rejected"]) for r in rows}
    frame = pd.concat([result["train"], result["eval"]])
    assert frame.loc[frame["prompt"] == 'Quote "this"', "source_row"].item() == 20


def test_tsv_and_malformed_rows(tmp_path):
    path = tmp_path / "prefs.tsv"
    lines = ["prompt\tchosen\trejected"] + [f"{r['prompt']}\t{r['chosen']}\t{r['rejected']}" for r in pairs(20)]
    lines.insert(3, "only\ttwo")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run(path)
    assert _texts(result) == EXPECTED
    (bad,) = result["rejects"]
    assert bad["reason"] == "malformed_row" and bad["row"] == 3 and "line 4" in bad["detail"]


def test_parquet(tmp_path):
    path = tmp_path / "prefs.parquet"
    pd.DataFrame(pairs(20)).drop(columns="meta").to_parquet(path)
    assert _texts(run(path)) == EXPECTED


def test_parquet_with_nulls(tmp_path):
    rows = pairs(20)
    rows[4]["rejected"] = None
    path = tmp_path / "prefs.parquet"
    pd.DataFrame(rows).drop(columns="meta").to_parquet(path)
    result = run(path)
    (bad,) = result["rejects"]
    assert (bad["reason"], bad["row"], bad["detail"]) == ("null_field", 5, "rejected is null")


def test_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(pairs(20)).save_to_disk(str(tmp_path / "saved"))
    assert _texts(run(tmp_path / "saved")) == EXPECTED


def test_save_to_disk_dataset_dict_with_eval_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs(20)),
                                    "test": datasets.Dataset.from_list(pairs(5, start=100))})
    dataset.save_to_disk(str(tmp_path / "saved"))
    result = run(tmp_path / "saved", eval_split="test")
    assert len(result["train"]) == 20 and len(result["eval"]) == 5


def test_hub_snapshot_layout(tmp_path):
    """What `lexalign download` lands for a Hub dataset: data/<split>-*.parquet beside README and lineage."""
    root = tmp_path / "snapshot"
    (root / "data").mkdir(parents=True)
    pd.DataFrame(pairs(12)).drop(columns="meta").to_parquet(root / "data" / "train-00000-of-00002.parquet")
    pd.DataFrame(pairs(8, start=12)).drop(columns="meta").to_parquet(root / "data" / "train-00001-of-00002.parquet")
    pd.DataFrame(pairs(4, start=50)).drop(columns="meta").to_parquet(root / "data" / "test-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nlicense: mit\n---\n# Prefs\n")
    (root / ".gitattributes").write_text("*.parquet filter=lfs\n")
    (root / "lineage.json").write_text("{}")
    assert [p.name for p in data_files(root, "train")] == ["train-00000-of-00002.parquet",
                                                          "train-00001-of-00002.parquet"]
    result = run(root, eval_split="test")
    assert _texts(result) - {(r["prompt"], r["chosen"], r["rejected"]) for r in pairs(4, start=50)} == EXPECTED
    assert result["report"]["eval_rows"] == 4


def test_split_named_folder_and_unknown_split(tmp_path):
    write_jsonl(tmp_path / "d" / "train" / "part-0.jsonl", pairs(10))
    write_jsonl(tmp_path / "d" / "validation" / "part-0.jsonl", pairs(3, start=40))
    assert run(tmp_path / "d", eval_split="validation")["report"]["eval_rows"] == 3
    with pytest.raises(LexAlignError, match='No files for split "test"') as err:
        run(tmp_path / "d", eval_split="test")
    assert "train/part-0.jsonl" in err.value.render()


def test_eval_split_needs_its_own_files(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", pairs(10))
    with pytest.raises(LexAlignError, match='No split "test"'):
        run(path, eval_split="test")


def test_unsupported_format_messages(tmp_path):
    path = tmp_path / "prefs.txt"
    path.write_text("prompt chosen rejected\n")
    with pytest.raises(LexAlignError) as err:
        run(path)
    lines = err.value.render().splitlines()
    assert lines[0] == 'Error: Unsupported dataset format "txt"'
    assert lines[1] == "Supported formats: auto, json, jsonl, csv, tsv, parquet, arrow"
    with pytest.raises(LexAlignError, match='Unsupported dataset format "xml"'):
        DatasetConfig(path=str(path), format="xml")


def test_missing_field_message(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "meta": i} for i in range(5)]
    with pytest.raises(LexAlignError) as err:
        run(write_jsonl(tmp_path / "train.jsonl", rows))
    assert err.value.render().splitlines() == [
        'Error: Dataset missing required field "rejected"',
        "Available fields: prompt, chosen, meta",
        "→ Expected format: {prompt: str, chosen: str, rejected: str}",
    ]


def test_field_mapping(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in pairs(20)]
    result = run(write_jsonl(tmp_path / "train.jsonl", rows), prompt_field="question", chosen_field="good",
                 rejected_field="bad")
    assert _texts(result) == EXPECTED
    with pytest.raises(LexAlignError, match='missing required field "question"'):
        run(write_jsonl(tmp_path / "other" / "train.jsonl", pairs(3)), prompt_field="question")


def test_dataset_not_found_and_empty_folder(tmp_path):
    with pytest.raises(LexAlignError, match="Dataset not found"):
        run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LexAlignError, match="No data files"):
        run(tmp_path / "empty")


def test_broken_json_is_a_message(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": ')
    with pytest.raises(LexAlignError, match="Could not read"):
        run(path)


def test_read_records_keeps_the_sft_contract(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [pair(1), "{oops", pair(2)])
    rows, bad = read_records(path)
    assert [r["_row"] for r in rows] == [1, 3] and rows[0]["_file"] == "train.jsonl"
    assert bad == [{"_row": 2, "_file": "train.jsonl", "reason": "unparseable_json", "detail": bad[0]["detail"]}]
