"""GDPO's K responses per prompt: ranked groups cut to K, pairs grouped into rankings."""

from __future__ import annotations

import pandas as pd
import pytest
from fixtures.data.helpers import pairs, run, write_jsonl

from lexalign.config.sections import DatasetConfig
from lexalign.core.errors import LexAlignError
from lexalign.data.ranking import rank, select_indices


def _all(result) -> list[dict]:
    return pd.concat([result["train"], result["eval"]]).sort_values("source_row").to_dict("records")


def test_select_indices_keeps_best_worst_and_evenly_spaced():
    assert select_indices(4, 4) == [0, 1, 2, 3]
    assert select_indices(5, 3) == [0, 2, 4]
    assert select_indices(10, 4) == [0, 3, 6, 9]
    assert select_indices(7, 2) == [0, 6]


def test_rank_total_order():
    responses, scores, info = rank([("a", "b"), ("b", "c"), ("c", "d"), ("a", "d")])
    assert responses == ["a", "b", "c", "d"] and scores == [3.0, 2.0, 1.0, 0.0]
    assert info == {"cycle": False, "tie": False}


def test_rank_partial_order_ties():
    responses, scores, info = rank([("a", "b"), ("a", "c")])
    assert responses == ["a", "b", "c"] and scores == [1.0, 0.0, 0.0] and info["tie"]


def test_rank_cycles_are_tied():
    responses, scores, info = rank([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("e", "a")])
    assert responses[0] == "e" and responses[-1] == "d"
    assert scores[1] == scores[2] == scores[3] and info["cycle"]
    assert rank([("x", "y"), ("y", "x")])[1] == [0.0, 0.0]


def _ranked_pairs(prompt: str, order: list[str]) -> list[dict]:
    return [{"prompt": prompt, "chosen": a, "rejected": b} for a, b in zip(order, order[1:], strict=False)]


def test_pairs_grouped_into_rankings(tmp_path):
    rows = []
    for i in range(6):
        rows += _ranked_pairs(f"prompt {i}", [f"r{j} of {i}" for j in range(5)])
    rows += _ranked_pairs("short", ["x", "y"])
    rows += [{"prompt": "cycle", "chosen": a, "rejected": b}
             for a, b in (("p", "q"), ("q", "r"), ("r", "p"), ("q", "s"), ("t", "p"))]
    loop = [{"prompt": "contradiction", "chosen": a, "rejected": b}
            for a, b in (("u", "v"), ("v", "w"), ("w", "x"), ("x", "u"))]
    rows += loop + loop[:2]
    result = run(write_jsonl(tmp_path / "train.jsonl", rows), group_size=4)
    records = {r["prompt"]: r for r in _all(result)}
    assert list(records["prompt 0"]["responses"]) == ["r0 of 0", "r1 of 0", "r3 of 0", "r4 of 0"]
    assert list(records["prompt 0"]["scores"]) == [4.0, 3.0, 1.0, 0.0]
    assert list(records["prompt 0"]["source_rows"]) == [1, 2, 3, 4]
    assert records["cycle"]["responses"][0] == "t" and records["cycle"]["responses"][-1] == "s"
    reasons = {}
    for item in result["rejects"]:
        reasons.setdefault(item["reason"], []).append(item["row"])
    assert reasons == {"too_few_responses": [25], "all_tied": [31, 32, 33, 34], "duplicate_row": [35, 36]}
    rankings = result["report"]["rankings"]
    assert rankings["with_cycles"] == 2 and rankings["total_order"] == 7 and rankings["pairs_used"] == 29
    assert result["report"]["responses_per_prompt"] == {"4": 7}


def test_group_size_two_uses_pairs_as_they_are(tmp_path):
    result = run(write_jsonl(tmp_path / "train.jsonl", pairs(10)), group_size=2)
    assert result["report"]["responses_per_prompt"] == {"2": 10}
    assert "source_rows" not in result["train"].columns


def test_ranked_groups_smaller_than_k_are_rejected(tmp_path):
    rows = [{"prompt": "big", "responses": list("abcdefg")}, {"prompt": "small", "responses": ["a", "b"]}]
    result = run(write_jsonl(tmp_path / "train.jsonl", rows), group_size=3)
    assert [(r["row"], r["reason"]) for r in result["rejects"]] == [(2, "too_few_responses")]
    (record,) = _all(result)
    assert list(record["responses"]) == ["a", "d", "g"] and list(record["scores"]) == [2.0, 1.0, 0.0]


def test_invalid_group_size():
    with pytest.raises(LexAlignError, match="group_size must be >= 2"):
        DatasetConfig.from_dict({"path": "x", "group_size": 1})
