"""Validated outputs: train/eval parquet, rejects.jsonl, report.json, the summary and the gate."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from fixtures.data.helpers import pair, pairs, write_jsonl

from lexalign.config.sections import DatasetConfig
from lexalign.core.errors import LexAlignError
from lexalign.data.common import write_split_outputs
from lexalign.data.validated import gate, is_validated_dir, summary
from lexalign.data.validation import validate_preferences, validate_to_dir


@pytest.fixture
def messy(tmp_path):
    rows = [json.dumps(r) for r in pairs(40)] + ["{oops", json.dumps(pair(3)),
                                                   json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"})]
    return write_jsonl(tmp_path / "data" / "train.jsonl", rows)


def _check_folder(folder, report):
    train = pd.read_parquet(folder / "train.parquet")
    evals = pd.read_parquet(folder / "eval.parquet")
    rejects = [json.loads(line) for line in (folder / "rejects.jsonl").read_text().splitlines()]
    saved = json.loads((folder / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert len(train) == report["train_rows"] and len(evals) == report["eval_rows"]
    assert len(rejects) == report["rejected_rows"]
    assert len(train) + len(evals) + len(rejects) == report["input_rows"]
    assert list(train.columns) == ["prompt", "chosen", "rejected", "responses", "scores", "source_row"]
    row = train.iloc[0]
    assert list(row["responses"]) == [row["chosen"], row["rejected"]] and list(row["scores"]) == [1.0, 0.0]
    assert str(train["source_row"].dtype) == "int64"
    assert not set(train["prompt"]) & set(evals["prompt"])
    assert is_validated_dir(folder)
    return train, evals, rejects


def test_validate_to_dir_streams_the_same_result(tmp_path, messy, demo_tokenizer):
    cfg = DatasetConfig(path=str(messy), eval_fraction=0.2)
    report = validate_to_dir(cfg, demo_tokenizer, tmp_path / "out", lineage={"stage": "validate"})
    train, evals, rejects = _check_folder(tmp_path / "out", report)
    assert json.loads((tmp_path / "out" / "lineage.json").read_text()) == {"stage": "validate"}
    assert {(r["row"], r["reason"]) for r in rejects} == {(41, "unparseable_json"), (42, "duplicate_row"),
                                                          (43, "chosen_equals_rejected")}
    memory = validate_preferences(cfg, demo_tokenizer)
    assert memory["report"] == report
    assert memory["train"]["source_row"].tolist() == train["source_row"].tolist()
    write_split_outputs(tmp_path / "again", memory, {"stage": "validate"})
    again, _, _ = _check_folder(tmp_path / "again", memory["report"])
    assert again["prompt"].tolist() == train["prompt"].tolist()


def test_report_contents(messy, demo_tokenizer):
    report = validate_preferences(DatasetConfig(path=str(messy)), demo_tokenizer)["report"]
    assert report["input_rows"] == 43 and report["rejected_rows"] == 3 and report["kept_rows"] == 40
    assert report["reject_reasons"] == {"chosen_equals_rejected": 1, "duplicate_row": 1, "unparseable_json": 1}
    assert report["responses_per_prompt"] == {"2": 40}
    assert set(report["lengths"]["tokens"]) == {"p50", "p90", "p99", "max", "mean"}
    assert report["files"] == [{"file": str(messy), "format": "jsonl", "split": "train"}]
    text = summary(report)
    assert text.startswith("Validated 43 rows (pairs)") and "unparseable_json: 1" in text and "p90" in text


def test_gate_stops_bad_data(tmp_path):
    rows = pairs(4) + [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 6
    result = validate_preferences(DatasetConfig(path=str(write_jsonl(tmp_path / "train.jsonl", rows))), None)
    with pytest.raises(LexAlignError) as err:
        gate(result["report"], "out")
    assert "60.0% of rows were rejected, above max_reject_fraction 50%" in err.value.render()
    gate(result["report"] | {"max_reject_fraction": 0.7}, "out")
    nothing = validate_preferences(DatasetConfig(path=str(write_jsonl(tmp_path / "none.jsonl", ["{"]))), None)
    with pytest.raises(LexAlignError, match="No usable training rows"):
        gate(nothing["report"] | {"max_reject_fraction": 1.0}, "out")


def test_failed_validation_leaves_no_output(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", pairs(3) + [pair(9) | {"chosen": "word " * 300}])
    with pytest.raises(LexAlignError):
        validate_to_dir(DatasetConfig(path=str(path), max_length=32, length_policy="fail"), demo_tokenizer,
                        tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stage_validate_end_to_end(tmp_path, messy, demo_model_dir):
    from lexalign.steps import inputs

    report = inputs.validate(raw=messy, tokenizer=demo_model_dir, output=tmp_path / "out",
                             dataset={"path": "ignored", "eval_fraction": 0.2})
    _check_folder(tmp_path / "out", report)
