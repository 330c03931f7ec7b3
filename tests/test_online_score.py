"""Per-completion scores for a round (lexalign/generation/completion_scores.py): the demo judge, a reward model in
length-sorted batches, an LLM judge on a loopback endpoint with retries; every score cached, none asked twice,
none lost when the judge fails part-way."""

from __future__ import annotations

import re

import pytest
from conftest import Counting, online_rows, write_reward_model
from loopback import ChatServer

from lexalign.core.errors import LexAlignError
from lexalign.generation import completion_scores as score
from lexalign.generation.completion_scores import DemoJudge, LlmJudge, RewardModelJudge, score_completions


def test_demo_scores_are_cached_and_never_asked_twice(tmp_path):
    cache = tmp_path / "scores.jsonl"
    judge = Counting(DemoJudge())
    scores, counts = score_completions(online_rows(), judge, cache, batch_size=2)
    assert scores == [[1.0, 0.0]] * 3
    assert (counts["asked"], counts["cached"], counts["unscored"], len(judge.asked)) == (6, 0, 0, 6)
    assert len(cache.read_text().splitlines()) == 6
    again = Counting(DemoJudge())
    assert score_completions(online_rows(), again, cache)[0] == scores and again.asked == []
    # Another policy's completions are other samples: asked, though their ids and texts are the same.
    _, counts = score_completions(online_rows(policy="policy-2"), again, cache)
    assert counts["asked"] == 6
    # A torn last line (a kill mid-write) is ignored, the rest read.
    with cache.open("a") as handle:
        handle.write('{"key": "abc", "sco')
    assert len(score.ScoreCache(cache).scores) == 12


def test_batches_are_sorted_by_length(tmp_path):
    rows, judge = online_rows(n=4)[::-1], Counting(DemoJudge())  # longest first, so sorting shows
    score_completions(rows, judge, tmp_path / "s.jsonl", batch_size=3)
    tokens = {text: len(r["prompt_ids"]) + len(ids) for r in rows
              for text, ids in zip(r["completions"], r["completion_ids"], strict=True)}
    lengths = [tokens[a] for a in judge.asked]
    assert len(lengths) == 8 and lengths == sorted(lengths) and lengths != [tokens[t] for t in tokens]


@pytest.mark.parametrize("reply, rating", [("Good. [[8]]", 8.0), ("[[3]] then [[10]]", 10.0), ("[[ 7.0 ]]", 7.0),
                                           ("[[11]]", None), ("eight", None), (None, None)])
def test_ratings_are_parsed(reply, rating):
    assert score.parse_rating(reply) == rating


# --- the LLM judge on loopback ----------------------------------------------------------------------

ANSWER = re.compile(r"\[The start of the answer\]\n(.*?)\n\[The end of the answer\]", re.S)
QUESTION = re.compile(r"\[User prompt\]\n(.*?)\n\n\[The start of the answer\]", re.S)


class RatingServer(ChatServer):
    """/v1/chat/completions on 127.0.0.1 rating an answer by its length (capped at 10), "no idea" for an answer
    starting with "?"; fails (HTTP 500) every request after `healthy` of them, or the first `flaky` ones; serves
    at most `limit` requests, so a looping client cannot run forever."""

    def __init__(self, healthy: int = 1000, flaky: int = 0, limit: int = 200):
        super().__init__(limit)
        self.healthy, self.flaky = healthy, flaky
        self.questions: list[str] = []

    def reply(self, body: dict, number: int) -> str | int:
        self.questions.append(QUESTION.search(body["messages"][-1]["content"]).group(1))
        if number > self.healthy or number <= self.flaky:
            return 500
        answer = ANSWER.search(body["messages"][-1]["content"]).group(1)
        return "no idea" if answer.startswith("?") else f"Fine. [[{min(len(answer), 10)}]]"


def llm(url: str, retries: int = 0) -> LlmJudge:
    return LlmJudge({"base_url": url, "model": "judge-7b", "api_key_env": None, "timeout": 10}, retries=retries,
                    backoff=0.0)


def test_llm_judge_rates_each_answer_and_counts_unrated_ones(tmp_path):
    rows = online_rows(n=2)
    rows[1]["completions"][1] = "? unsure"
    for r in rows:
        r["question"] = f"Q{r['row']}"  # the prompt as the user gave it; `prompt` is the chat-template text
    with RatingServer() as server:
        scores, counts = score_completions(rows, llm(server.url), tmp_path / "s.jsonl")
    assert server.requests == 4 and sorted(server.questions) == ["Q0", "Q0", "Q1", "Q1"]
    assert scores == [[6.0, 9.0], [7.0, None]]  # rated by length: "Hello " 6, "Go away x" 9, "Hello x" 7
    assert counts["unscored"] == 1


def test_a_judge_failing_mid_round_keeps_every_finished_score(tmp_path):
    rows, cache = online_rows(n=5), tmp_path / "s.jsonl"
    with RatingServer(healthy=6) as server, pytest.raises(LexAlignError) as err:
        score_completions(rows, llm(server.url), cache, batch_size=4)
    text = err.value.render()
    assert "failed before the round's scores were all finished" in text
    assert "HTTP 500" in text and "6 scores finished" in text
    assert "Traceback" not in text
    assert len(score.ScoreCache(cache).scores) == 6  # the first batch (4) and 2 of the second
    with RatingServer() as server:
        scores, counts = score_completions(rows, llm(server.url), cache, batch_size=4)
    assert server.requests == 4 and counts["asked"] == 4  # only the 10 - 6 missing ones
    assert all(s is not None for group in scores for s in group)


def test_an_endpoint_that_goes_away_mid_round_is_a_clear_error_and_keeps_the_scores(tmp_path):
    rows, cache = online_rows(n=3), tmp_path / "s.jsonl"
    server = RatingServer().__enter__()
    judge = llm(server.url, retries=1)
    score_completions(rows[:1], judge, cache)
    server.__exit__(None, None, None)  # the judge's server stops: connections are refused
    with pytest.raises(LexAlignError) as err:
        score_completions(rows, judge, cache)
    text = err.value.render()
    assert "did not answer" in text and "0 scores finished in this run" in text and "(2 in all)" in text
    assert len(score.ScoreCache(cache).scores) == 2


def test_transient_failures_are_retried_and_a_dead_endpoint_is_a_clear_error(tmp_path):
    """Retried: HTTP 500s (an overloaded server). A judge that dies after answering some requests is
    test_a_judge_failing_mid_round_keeps_every_finished_score; one that is not there at all fails at once."""
    with RatingServer(flaky=2) as server:
        scores, _ = score_completions(online_rows(n=1), llm(server.url, retries=2), tmp_path / "a.jsonl", batch_size=1)
    assert server.requests == 4 and scores == [[6.0, 9.0]]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(LexAlignError, match="did not answer"):  # before anything is asked
        llm(f"http://127.0.0.1:{port}/v1", retries=1)


# --- a reward model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, zoo_models):
    """A tiny random-weight sequence-classification reward model (one label) with the zoo's Llama-3 tokenizer."""
    return write_reward_model(tmp_path_factory.mktemp("reward-model"), zoo_models("llama3"))


def test_reward_model_scores_are_the_same_batched_or_one_at_a_time(reward_model_dir, tmp_path):
    rows = online_rows(n=4, k=3)
    one, _ = score_completions(rows, RewardModelJudge(reward_model_dir, chat=True, batch_size=1), tmp_path / "a.jsonl",
                               batch_size=1)
    batched, counts = score_completions(rows, RewardModelJudge(reward_model_dir, chat=True, batch_size=8),
                                        tmp_path / "b.jsonl", batch_size=8)
    assert counts["asked"] == 12 and len({s for group in batched for s in group}) > 1
    assert [s for g in batched for s in g] == pytest.approx([s for g in one for s in g], abs=1e-5)
    # Fully cached: the reward model is not even loaded.
    judge = RewardModelJudge(reward_model_dir, chat=True)
    score_completions(rows, judge, tmp_path / "b.jsonl")
    assert judge._loaded is None


def test_a_reward_model_that_does_not_load_is_a_clear_error(zoo_models, tmp_path):
    with pytest.raises(LexAlignError, match="not a sequence-classification reward model") as err:
        score_completions(online_rows(), RewardModelJudge(zoo_models("llama3"), chat=True), tmp_path / "s.jsonl")
    assert "online.judge.reward_model" in err.value.render()
