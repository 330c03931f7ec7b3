"""Selection of the round's preference data from K judged completions (lexalign/generation/selection.py), worked by
hand: which completion is chosen, rejected or ranked where, and every dropped one counted."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from conftest import selected_token_table

from lexalign.core.errors import LexAlignError
from lexalign.generation import selection
from lexalign.train.trainer_data import sampled_token_table, trainer_dataset


def judged(row: int, scores: list, truncated: list | None = None, ids: list | None = None) -> dict:
    """A prompt with K completions "a", "b", ... whose ids are [row, i] unless given."""
    k = len(scores)
    return {"row": row, "prompt": f"p{row}", "prompt_ids": [100 + row], "completions": [chr(97 + i) for i in range(k)],
            "completion_ids": ids or [[row, i] for i in range(k)], "truncated": truncated or [False] * k,
            "scores": scores}


def test_best_worst_by_hand():
    rows = [
        judged(0, [0.2, 0.9, -1.0, 0.5]),            # b over c
        judged(1, [1.0, 1.0, 0.0, 0.0]),             # equal best and worst: the first of each, a over c
        judged(2, [0.3, 0.3, 0.3]),                  # all tied: dropped, counted
        judged(3, [5.0, None, 1.0]),                 # the unscored one is left out: a over c
        judged(4, [9.0, 1.0, 0.0], [True, False, False]),  # the best is truncated: dropped, so b over c
        judged(5, [None, 2.0, None]),                # one scored completion: too few
        judged(6, [3.0, 1.0 + 1e-9, 1.0]),           # within the judges' tie tolerance: a over b (the first lowest)
    ]
    pairs, counts = selection.best_worst(rows)
    assert [(p["row"], p["chosen"], p["rejected"]) for p in pairs] == [
        (0, "b", "c"), (1, "a", "c"), (3, "a", "c"), (4, "b", "c"), (6, "a", "b")]
    assert counts == {"prompts": 7, "unscored": 3, "truncated_dropped": 1, "duplicates_merged": 0, "too_few": 1,
                      "ties": 1, "all_tied": 0, "selected": 5}
    first = pairs[0]
    assert (first["chosen_score"], first["rejected_score"]) == (0.9, -1.0)
    assert (first["prompt_ids"], first["chosen_ids"], first["rejected_ids"]) == ([100], [0, 1], [0, 2])
    # keep_truncated: the truncated best completion is chosen.
    kept, counts = selection.best_worst(rows[4:5], keep_truncated=True)
    assert (kept[0]["chosen"], counts["truncated_dropped"]) == ("a", 0)


def test_identical_completions_are_merged_before_choosing():
    # a and c are the same ids judged differently (an LLM judge is not deterministic): c is merged into a.
    rows = [judged(0, [1.0, 0.5, 0.0], ids=[[7, 8], [9], [7, 8]]), judged(1, [1.0, 1.0], ids=[[3], [3]])]
    pairs, counts = selection.best_worst(rows)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "b")]
    assert (counts["duplicates_merged"], counts["too_few"]) == (2, 1)


def test_ranked_by_hand():
    rows = [
        judged(0, [0.1, 0.7, 0.4, 0.9]),             # d b c a
        judged(1, [2.0, 1.0, 2.0, 0.0]),             # ties keep their sampled order: a c b d
        judged(2, [1.0, 1.0, 1.0, 1.0]),             # all tied
        judged(3, [1.0, 0.0, None, 3.0]),            # three scored: too few for 4
        judged(4, [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]),   # six: best, worst and evenly spaced between: a c d f
    ]
    groups, counts = selection.ranked(rows, group_size=4)
    assert [(g["row"], g["responses"]) for g in groups] == [
        (0, ["d", "b", "c", "a"]), (1, ["a", "c", "b", "d"]), (4, ["a", "c", "d", "f"])]
    assert groups[0]["scores"] == [0.9, 0.7, 0.4, 0.1]
    assert groups[0]["completion_ids"] == [[0, 3], [0, 1], [0, 2], [0, 0]]
    assert counts == {"prompts": 5, "unscored": 1, "truncated_dropped": 0, "duplicates_merged": 0, "too_few": 1,
                      "ties": 0, "all_tied": 1, "selected": 3}
    with pytest.raises(ValueError, match="at least 2"):
        selection.ranked(rows, group_size=1)


def test_token_tables_are_what_the_trainers_read():
    pairs, _ = selection.best_worst([judged(0, [0.0, 1.0]), judged(1, [1.0, 0.0])])
    dataset = trainer_dataset(selected_token_table(pairs), "pairs")
    assert dataset.to_list() == [{"prompt_ids": [100], "chosen_ids": [0, 1], "rejected_ids": [0, 0]},
                                 {"prompt_ids": [101], "chosen_ids": [1, 0], "rejected_ids": [1, 1]}]
    groups, _ = selection.ranked([judged(0, [0.0, 2.0, 1.0])], group_size=3)
    dataset = trainer_dataset(selected_token_table(groups), "k3")
    assert dataset.to_list() == [{"prompt_ids": [100], "completion_ids": [[0, 1], [0, 2], [0, 0]],
                                  "scores": [2.0, 1.0, 0.0]}]
    assert selected_token_table([]).num_rows == 0


def _write_jsonl(path, records, keep):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in records))
    return path


def test_the_existing_validation_reads_both_layouts(tmp_path, demo_model_dir):
    """The selection's rows, written as they are (ids and scores beside the text), pass the existing validation:
    best_worst as `pairs`, ranked as `ranked` groups of K (its report counts them)."""
    from lexalign.steps import inputs

    rows = [judged(i, [float((i + j) % 4) for j in range(4)]) for i in range(12)]
    for r in rows:  # distinct texts per prompt, so validation sees distinct responses
        r["completions"] = [f" Hello {r['row']}-{j}!" for j in range(4)]
    pairs, _ = selection.best_worst(rows)
    raw = _write_jsonl(tmp_path / "pairs" / "train.jsonl", pairs, list(pairs[0]))
    report = inputs.validate(raw=raw, tokenizer=demo_model_dir, output=tmp_path / "pairs-data",
                             dataset={"eval_fraction": 0.25, "max_length": 64})
    assert (report["input_rows"], report["kept_rows"], report["rejected_rows"]) == (12, 12, 0)
    assert report["shape"] == "pairs" and report["length_bias"]["pairs"] == 12
    _check_tokens(tmp_path / "pairs-data", pairs, "pairs", lambda r: [r["chosen_ids"], r["rejected_ids"]])
    groups, _ = selection.ranked(rows, group_size=4)
    raw = _write_jsonl(tmp_path / "groups" / "train.jsonl", groups, list(groups[0]))
    report = inputs.validate(raw=raw, tokenizer=demo_model_dir, output=tmp_path / "groups-data",
                             dataset={"eval_fraction": 0.25, "max_length": 64, "group_size": 4})
    assert (report["input_rows"], report["kept_rows"], report["rejected_rows"]) == (12, 12, 0)
    assert report["shape"] == "ranked" and report["responses_per_prompt"] == {"4": 12}
    _check_tokens(tmp_path / "groups-data", groups, "k4", lambda r: r["completion_ids"])


def _check_tokens(data, records, layout, completions):
    """Every validated row (train and eval) gets back the ids its record was selected with."""
    import pandas as pd

    by_prompt = {r["prompt_ids"][0]: r for r in records}
    seen = 0
    for split in ("train", "eval"):
        frame = pd.read_parquet(data / f"{split}.parquet")
        table = sampled_token_table(frame, layout, records)
        table = table.append_column("scores", pa.array([list(map(float, s)) for s in frame["scores"]],
                                                       type=pa.list_(pa.float64())))
        dataset = trainer_dataset(table, layout)
        for example in dataset or []:
            record = by_prompt[example["prompt_ids"][0]]
            got = [example["chosen_ids"], example["rejected_ids"]] if layout == "pairs" else example["completion_ids"]
            assert got == completions(record)
            seen += 1
    assert seen == len(records)
    frame = pd.read_parquet(data / "train.parquet")
    with pytest.raises(LexAlignError, match="does not match the round's selection"):
        sampled_token_table(frame, layout, records[::-1])
