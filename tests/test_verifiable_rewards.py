"""Verifiable rewards as a round's judge (lexalign/generation/completion_scores.py): IFEval's checkers and a user's
reward function score each completion; scores are cached under the judge's identity (the function file's content
included), a function that fails part-way keeps every finished score, and an instruction whose checker cannot run
here is refused when the workflow is planned."""

from __future__ import annotations

import textwrap

import pytest
from conftest import Counting

from lexalign.core.errors import LexAlignError
from lexalign.generation import completion_scores as score
from lexalign.generation.completion_scores import make_judge, score_completions

pytest.importorskip("lm_eval.tasks.ifeval.instructions_registry")

NO_COMMA = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
QUOTED_LOWER = {"instruction_id_list": ["startend:quotation", "change_case:english_lowercase"], "kwargs": [{}, {}]}


def rows(prompts: dict[str, list[str]]) -> list[dict]:
    """Generations rows as the generate step writes them, one per prompt, its completions as given."""
    return [{"row": i, "prompt": p, "question": p, "prompt_ids": [1, 2, i], "policy_hash": "policy-1",
             "completion_ids": [[10 + i, j] for j in range(len(texts))], "completions": texts,
             "truncated": [False] * len(texts)} for i, (p, texts) in enumerate(prompts.items())]


def write(folder, text: str, name: str = "rewards.py"):
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_ifeval_scores_each_completion_by_the_share_of_its_instructions_followed(tmp_path):
    fields = {"Describe tea.": NO_COMMA, "Describe rain.": QUOTED_LOWER}
    generated = rows({"Describe tea.": ["Tea is warm and calm.", "Tea is warm, and calm."],
                      "Describe rain.": ['"rain falls softly."', '"Rain falls softly."', "rain falls softly."]})
    judge = make_judge("ifeval", chat=True, reward_model=None, llm_judge={}, device="cpu", fields=fields)
    scores, counts = score_completions(generated, judge, tmp_path / "scores.jsonl")
    # Worked by hand: no comma → 1, a comma → 0; quoted and lowercase → 1, quoted with a capital → 1/2,
    # lowercase unquoted → 1/2.
    assert scores == [[1.0, 0.0], [1.0, 0.5, 0.5]]
    assert counts["asked"] == 5 and judge.name.startswith("ifeval-strict:lm-eval-")


def test_ifeval_refuses_a_prompt_without_instructions_by_name(tmp_path):
    judge = make_judge("ifeval", chat=True, reward_model=None, llm_judge={}, device="cpu", fields={})
    with pytest.raises(LexAlignError) as err:
        score_completions(rows({"Say hi.": ["hi"]}), judge, tmp_path / "s.jsonl")
    assert "no instruction_id_list" in err.value.render() and "'Say hi.'" in err.value.render()


def test_a_reward_function_gets_the_prompt_rows_fields_as_trl_passes_them(tmp_path):
    write(tmp_path, '''
        def reward(prompts, completions, answer, **kwargs):
            return [float(c.strip() == a) for c, a in zip(completions, answer)]
    ''')
    fields = {"2+2?": {"answer": "4"}, "3+3?": {"answer": "6"}}
    judge = make_judge({"python": f"{tmp_path}/rewards.py:reward"}, True, None, {}, "cpu", fields=fields)
    scores, _ = score_completions(rows({"2+2?": ["4", "5"], "3+3?": [" 6", "six"]}), judge, tmp_path / "s.jsonl")
    assert scores == [[1.0, 0.0], [1.0, 0.0]]


def test_a_function_that_raises_part_way_keeps_every_finished_score(tmp_path):
    """A function failing on the third batch (an API it calls went away) stops the step with its error and line; the
    two finished batches are cached, and the rerun asks only the rest."""
    switch = tmp_path / "down"
    write(tmp_path, f'''
        from pathlib import Path

        def reward(prompts, completions, **kwargs):
            if Path({str(switch)!r}).exists() and any("c" in c for c in completions):
                raise ConnectionError("the scoring service went away")
            return [float(len(c)) for c in completions]
    ''')
    generated = rows({"p": ["a", "aa", "bbb", "bbbb", "ccccc", "cccccc"]})  # by length: batches a|b|c
    cache = tmp_path / "s.jsonl"
    switch.touch()
    judge = make_judge({"python": f"{tmp_path}/rewards.py:reward"}, True, None, {}, "cpu")
    with pytest.raises(LexAlignError) as err:
        score_completions(generated, judge, cache, batch_size=2)
    text = err.value.render()
    assert "rewards.py:reward raised ConnectionError: the scoring service went away" in text
    assert "4 scores finished in this run are kept" in text and "Traceback" not in text
    assert len(score.ScoreCache(cache).scores) == 4
    switch.unlink()
    counted = Counting(make_judge({"python": f"{tmp_path}/rewards.py:reward"}, True, None, {}, "cpu"))
    scores, counts = score_completions(generated, counted, cache, batch_size=2)
    assert scores == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]
    assert (counts["asked"], counts["cached"]) == (2, 4) and sorted(counted.asked) == ["ccccc", "cccccc"]


def test_a_wrong_count_stops_the_step_naming_the_function_and_keeps_what_was_scored(tmp_path):
    write(tmp_path, '''
        def reward(prompts, completions, **kwargs):
            return [1.0] * (len(completions) - any(len(c) > 3 for c in completions))
    ''')
    cache = tmp_path / "s.jsonl"
    judge = make_judge({"python": f"{tmp_path}/rewards.py:reward"}, True, None, {}, "cpu")
    with pytest.raises(LexAlignError) as err:
        score_completions(rows({"p": ["a", "bb", "cccc", "ddddd"]}), judge, cache, batch_size=2)
    assert "rewards.py:reward returned 1 rewards for 2 completions" in err.value.render()
    assert len(score.ScoreCache(cache).scores) == 2


def test_an_edited_function_is_another_judge_so_nothing_cached_under_the_old_one_is_reused(tmp_path):
    write(tmp_path, "def reward(prompts, completions, **kw):\n    return [1.0 for _ in completions]\n")
    cache, generated = tmp_path / "s.jsonl", rows({"p": ["a", "b"]})
    first = make_judge({"python": f"{tmp_path}/rewards.py:reward"}, True, None, {}, "cpu")
    assert score_completions(generated, first, cache)[0] == [[1.0, 1.0]]
    write(tmp_path, "def reward(prompts, completions, **kw):\n    return [2.0 for _ in completions]\n")
    edited = make_judge({"python": f"{tmp_path}/rewards.py:reward"}, True, None, {}, "cpu")
    assert edited.name != first.name
    assert score_completions(generated, edited, cache)[0] == [[2.0, 2.0]]


def _config(online_judge, types=None, nltk_data=None, evaluate_judge="none"):
    return {"evaluate": {"judge": evaluate_judge, "ifeval": {"prompts": None, "nltk_data": nltk_data}},
            "online": {"offline": False, "judge": online_judge,
                       "prompts": {"from": "instructions", "instructions": {"types": types}}}}


def test_an_instruction_whose_checker_needs_absent_data_is_refused_when_planned(tmp_path, monkeypatch):
    import sys

    from lexalign.pipeline.plan import check_judges

    # NLTK's search path without the data an earlier test in this process put on it (or a home directory's).
    if "nltk.data" in sys.modules:
        monkeypatch.setattr(sys.modules["nltk.data"], "path", [])
    monkeypatch.setenv("NLTK_DATA", "")
    monkeypatch.setenv("HOME", str(tmp_path))

    check_judges(_config("ifeval", ["punctuation:no_comma"]))  # needs nothing: planned
    with pytest.raises(LexAlignError) as err:
        check_judges(_config("ifeval", ["punctuation:no_comma", "length_constraints:number_sentences"],
                             nltk_data=str(tmp_path / "empty")))
    text = err.value.render()
    assert "length_constraints:number_sentences (online.prompts.instructions.types)" in text
    assert "punkt" in text and "lexalign fetch punkt" in text and "no_comma" not in text.split("→")[0]


def test_a_missing_reward_function_file_is_refused_when_planned(tmp_path):
    from lexalign.pipeline.plan import check_judges

    with pytest.raises(LexAlignError) as err:
        check_judges(_config({"python": f"{tmp_path}/missing.py:reward"}))
    assert "online.judge.python" in err.value.render() and "missing.py" in err.value.render()
