"""The shapes preference data comes in: explicit, conversational, implicit prompt, ranked."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from fixtures.data.helpers import run, write_jsonl

from lexalign.core.errors import LexAlignError
from lexalign.data.shapes import Rejected, implicit_prompt


def _all(result) -> list[dict]:
    return pd.concat([result["train"], result["eval"]]).sort_values("source_row").to_dict("records")


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


def test_conversational_without_prompt_ultrafeedback_binarized(tmp_path, demo_tokenizer):
    rows = [{"prompt": f"Greet user {i}", "prompt_id": str(i),
             "chosen": [_user(f"Greet user {i}"), _bot(f"Hello {i}!")],
             "rejected": [_user(f"Greet user {i}"), _bot("Go away.")],
             "score_chosen": 9.0, "score_rejected": 2.0} for i in range(12)]
    rows[3].pop("prompt")
    result = run(write_jsonl(tmp_path / "train.jsonl", rows), demo_tokenizer)
    assert result["report"]["shape"] == "conversational" and result["report"]["rejected_rows"] == 0
    first = _all(result)[0]
    prompt = demo_tokenizer.apply_chat_template([_user("Greet user 0")], tokenize=False, add_generation_prompt=True)
    full = demo_tokenizer.apply_chat_template([_user("Greet user 0"), _bot("Hello 0!")], tokenize=False)
    assert first["prompt"] == prompt and prompt.startswith("User: Greet user 0")
    assert first["chosen"] == full[len(prompt):] and "Hello 0!<|eos|>" in first["chosen"]
    assert "Go away." in first["rejected"]


def test_conversational_with_separate_prompt_messages_and_system(tmp_path, demo_tokenizer):
    rows = [{"prompt": [{"role": "system", "content": "Be kind."}, _user(f"Hi {i}")],
             "chosen": [_bot("Hello!")], "rejected": [_bot("Bye.")]} for i in range(6)]
    rows.append({"prompt": "plain prompt", "chosen": [_bot("Yes")], "rejected": [_bot("No")]})
    result = run(write_jsonl(tmp_path / "train.jsonl", rows), demo_tokenizer)
    records = _all(result)

    def render(messages):
        return demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert records[0]["prompt"] == render([{"role": "system", "content": "Be kind."}, _user("Hi 0")])
    assert records[-1]["prompt"] == render([_user("plain prompt")])


def test_conversation_checks(tmp_path, demo_tokenizer):
    good = {"chosen": [_user("q"), _bot("a")], "rejected": [_user("q"), _bot("b")]}
    rows = [
        good,
        {"chosen": [_user("q"), _user("again"), _bot("a")], "rejected": [_user("q"), _user("again"), _bot("b")]},
        {"chosen": [_user("q"), _bot("a"), _user("more")], "rejected": [_user("q"), _bot("b"), _user("more")]},
        {"chosen": [_user("q"), _bot("a")], "rejected": [_user("other"), _bot("b")]},
        {"chosen": [_user("q"), {"role": "robot", "content": "a"}], "rejected": [_user("q"), _bot("b")]},
        {"chosen": [_user("q"), _bot("  ")], "rejected": [_user("q"), _bot("b")]},
        {"chosen": [_user("q"), {"role": "assistant"}], "rejected": [_user("q"), _bot("b")]},
        {"chosen": [_user("q"), _bot("a")], "rejected": "b"},
        {"chosen": [_bot("a")], "rejected": [_bot("b")]},
    ]
    result = run(write_jsonl(tmp_path / "train.jsonl", rows), demo_tokenizer)
    reasons = {r["row"]: r["reason"] for r in result["rejects"]}
    assert reasons == {2: "roles_not_alternating", 3: "not_ending_with_assistant", 4: "prompt_mismatch",
                       5: "bad_message", 6: "empty_field", 7: "bad_message", 8: "non_string_field",
                       9: "missing_field"}


def test_chat_template_that_does_not_round_trip(tmp_path, demo_tokenizer):
    tokenizer = demo_tokenizer.__class__.from_pretrained(demo_tokenizer.name_or_path)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}|{% endfor %}"
                               "{% if add_generation_prompt %}<think></think>{% endif %}")
    rows = [{"chosen": [_user("q"), _bot("a")], "rejected": [_user("q"), _bot("b")]}]
    result = run(write_jsonl(tmp_path / "train.jsonl", rows), tokenizer)
    assert result["rejects"][0]["reason"] == "chat_template_mismatch"
    tokenizer.chat_template = None
    with pytest.raises(LexAlignError, match="chat template"):
        run(write_jsonl(tmp_path / "train.jsonl", rows), tokenizer)


def test_implicit_prompt_hh_rlhf(tmp_path):
    turns = "\n\nHuman: What is {i}+{i}?\n\nAssistant: {j}.\n\nHuman: Sure?\n\nAssistant:"
    rows = [{"chosen": turns.format(i=i, j=2 * i) + f" Yes, {2 * i}.",
             "rejected": turns.format(i=i, j=2 * i) + " No idea."} for i in range(10)]
    rows.append({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                 "rejected": "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: d"})
    rows.append({"chosen": "\n\nHuman: same\n\nAssistant: same", "rejected": "\n\nHuman: same\n\nAssistant: same"})
    result = run(write_jsonl(tmp_path / "train.jsonl", rows))
    assert result["report"]["shape"] == "implicit_prompt"
    first = _all(result)[0]
    assert first["prompt"] == "\n\nHuman: What is 0+0?\n\nAssistant: 0.\n\nHuman: Sure?\n\nAssistant:"
    assert (first["chosen"], first["rejected"]) == (" Yes, 0.", " No idea.")
    assert {r["row"]: r["reason"] for r in result["rejects"]} == {11: "no_shared_prompt",
                                                                   12: "chosen_equals_rejected"}


def test_implicit_prompt_unit():
    assert implicit_prompt("H: hi\nAssistant: yes", "H: hi\nAssistant: no") == ("H: hi\nAssistant:", " yes", " no")
    with pytest.raises(Rejected):
        implicit_prompt("nothing shared", "at all")


def test_no_prompt_and_no_transcripts_is_a_missing_field(tmp_path):
    with pytest.raises(LexAlignError, match='missing required field "prompt"'):
        run(write_jsonl(tmp_path / "train.jsonl", [{"chosen": "a", "rejected": "b"}]))


def test_ranked_by_order(tmp_path):
    rows = [{"prompt": f"p{i}", "responses": [f"best {i}", f"good {i}", f"ok {i}", f"bad {i}"]} for i in range(8)]
    result = run(write_jsonl(tmp_path / "train.jsonl", rows), group_size=4)
    record = _all(result)[0]
    assert list(record["responses"]) == ["best 0", "good 0", "ok 0", "bad 0"]
    assert list(record["scores"]) == [3.0, 2.0, 1.0, 0.0]
    assert result["report"]["responses_per_prompt"] == {"4": 8}


def test_ranked_by_scores_with_ties(tmp_path):
    rows = [{"prompt": "p", "responses": ["c", "a", "b", "d"], "scores": [2, 9, 2, 1]}]
    record = _all(run(write_jsonl(tmp_path / "train.jsonl", rows), group_size=4))[0]
    assert list(record["responses"]) == ["a", "c", "b", "d"] and list(record["scores"]) == [9, 2, 2, 1]


def test_raw_ultrafeedback_completions(tmp_path):
    rows = [{"instruction": f"Explain {i}", "source": "evol",
             "completions": [{"model": m, "response": f"{m} on {i}", "overall_score": s, "fine-grained_score": s / 2}
                             for m, s in (("a", 6.5), ("b", 8.0), ("c", 3.0), ("d", 7.0))]} for i in range(6)]
    rows.append({"instruction": "bad", "completions": [{"response": "x", "overall_score": "N/A"},
                                                       {"response": "y", "overall_score": 3}]})
    result = run(write_jsonl(tmp_path / "train.jsonl", rows), prompt_field="instruction",
                 responses_field="completions", group_size=3)
    record = _all(result)[0]
    assert list(record["responses"]) == ["b on 0", "a on 0", "c on 0"]  # best, evenly spaced, worst
    assert list(record["scores"]) == [8.0, 6.5, 3.0]
    assert result["rejects"][0]["reason"] == "bad_score"
    assert result["report"]["input_responses_per_prompt"] == {"4": 6}


def test_ranked_for_dpo_keeps_best_and_worst(tmp_path):
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 3, 2]}]
    record = _all(run(write_jsonl(tmp_path / "train.jsonl", rows)))[0]
    assert (record["chosen"], record["rejected"], list(record["scores"])) == ("b", "a", [3.0, 1.0])


def test_ranked_row_checks(tmp_path):
    rows = [
        {"prompt": "p1", "responses": ["a", "b"], "scores": [1, 1]},
        {"prompt": "p2", "responses": ["a", "a"]},
        {"prompt": "p3", "responses": ["a", 7]},
        {"prompt": "p4", "responses": ["a", "b"], "scores": [1]},
        {"prompt": "p5", "responses": "a, b"},
        {"prompt": "p6", "responses": ["a", "b", "a"]},
    ]
    result = run(write_jsonl(tmp_path / "train.jsonl", rows))
    assert {r["row"]: r["reason"] for r in result["rejects"]} == {
        1: "all_tied", 2: "too_few_responses", 3: "non_string_field", 4: "bad_score", 5: "non_string_field"}
    assert result["report"]["notes"] == {"duplicate_responses_merged": 2}


def test_csv_cells_holding_json_lists(tmp_path):
    frame = pd.DataFrame({"prompt": ["p", "q"], "responses": [json.dumps(["a", "b", "c"]), json.dumps(["x", "y"])]})
    frame.to_csv(tmp_path / "train.csv", index=False)
    result = run(tmp_path / "train.csv", group_size=3)
    assert [r["reason"] for r in result["rejects"]] == ["too_few_responses"]
    assert list(_all(result)[0]["responses"]) == ["a", "b", "c"]
