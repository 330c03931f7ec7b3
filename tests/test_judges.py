"""Did alignment work, for any model: samples, lengths and the judges (demo, reward model, an LLM behind an
OpenAI-compatible endpoint on loopback), each a win rate against the SFT model with a bootstrap interval."""

from __future__ import annotations

import json
import re
import socket

import pytest
from loopback import ChatServer

from lexalign.core.errors import LexAlignError
from lexalign.generation import judges
from lexalign.steps import inputs, results

PLANTED_KEY = "sk-PlantedJudgeKeyForLeakTests0123456789"


# --- win rates and their intervals ------------------------------------------------------------------


def test_win_rate_counts_ties_half_and_the_interval_is_seeded_and_holds_it():
    scores = [1.0] * 6 + [0.5] * 2 + [0.0] * 2
    first = judges.summarise("j", scores, seed=3)
    assert first["win_rate"] == pytest.approx(0.7)
    assert (first["wins"], first["ties"], first["losses"], first["n"]) == (6, 2, 2, 10)
    assert first["ci_low"] < 0.7 < first["ci_high"] and 0.0 <= first["ci_low"] and first["ci_high"] <= 1.0
    assert judges.summarise("j", scores, seed=3) == first  # seeded: the same interval every time
    assert judges.summarise("j", [1.0] * 5, seed=0)["ci_low"] == 1.0  # no spread, no width
    empty = judges.summarise("j", [], seed=0)
    assert empty["win_rate"] is None and empty["ci_low"] is None and empty["n"] == 0


def test_rewards_compare_per_prompt_with_ties_for_equal_rewards():
    result = judges.from_rewards("rm", sft=[0.0, 1.0, 2.0, 5.0], aligned=[1.0, 1.0, 1.0, 5.0 + 1e-9], seed=0)
    assert (result["wins"], result["ties"], result["losses"]) == (1, 2, 1)
    assert result["win_rate"] == pytest.approx(0.5)
    assert result["mean_reward_sft"] == pytest.approx(2.0) and result["mean_reward_aligned"] == pytest.approx(2.0)


def test_demo_judge_is_a_win_rate_too():
    result = judges.demo_judge(sft=[" Go away Zoe.", " Hello Bob!", " Go away."],
                               aligned=[" Hello Zoe!", " Hello Bob!", " Go away now."], seed=0)
    assert result["name"] == "demo-polite-greeting"
    assert (result["wins"], result["ties"], result["losses"]) == (1, 2, 0)
    assert result["mean_reward_sft"] == pytest.approx(1 / 3) and result["mean_reward_aligned"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("reply, verdict", [
    ("Answer B is kinder. [[B]]", "B"), ("[[A]] at first, but on reflection [[C]]", "C"), ("[[ b ]]", "B"),
    ("A", "A"), ("tie.", "C"), ("I cannot decide.", None), ("", None), (None, None), ("[[D]]", None),
])
def test_verdicts_are_parsed_or_counted_as_unparseable(reply, verdict):
    assert judges.parse_verdict(reply) == verdict


# --- the LLM judge against a loopback OpenAI-compatible server --------------------------------------

ANSWER = re.compile(r"\[The start of answer (A|B)\]\n(.*?)\n\[The end of answer \1\]", re.S)


class JudgeServer(ChatServer):
    """/v1/chat/completions on 127.0.0.1: prefers the longer answer, answers garbage when both are as long (or
    always "[[A]]" with position_biased); records the Authorization headers; refuses past `limit` requests."""

    def __init__(self, position_biased: bool = False, limit: int = 200):
        super().__init__(limit)
        self.position_biased = position_biased

    def reply(self, body: dict, number: int) -> str:
        answers = dict(ANSWER.findall(body["messages"][-1]["content"]))
        a, b = len(answers["A"]), len(answers["B"])
        return "[[A]]" if self.position_biased or a > b else "[[B]]" if b > a else "Both are fine, I think."


def _config(url: str, **extra) -> dict:
    return {"base_url": url, "model": "judge-7b", "api_key_env": None, "timeout": 10, **extra}


def test_llm_judge_asks_both_orders_and_counts_unparseable_answers_as_ties(monkeypatch):
    prompts = [f"User: question {i}\nAssistant:" for i in range(5)]
    sft = [" short", " short", " short", " a much longer answer", " same"]
    aligned = [" a longer answer", " a longer answer", " a longer answer", " tiny", " same"]
    monkeypatch.setenv("JUDGE_KEY", PLANTED_KEY)
    with JudgeServer() as server:
        result = judges.llm_judge(_config(server.url, api_key_env="JUDGE_KEY"), prompts, sft, aligned, seed=0)
    assert server.requests == 10 and result["asked"] == 10  # each pair asked twice
    assert set(server.auth) == {f"Bearer {PLANTED_KEY}"}
    # 3 wins, 1 loss, 1 tie (both verdicts unparseable): (3 + 0.5) / 5
    assert (result["wins"], result["ties"], result["losses"]) == (3, 1, 1)
    assert result["win_rate"] == pytest.approx(0.7) and result["unparseable"] == 2 and result["inconsistent"] == 0
    assert result["name"] == "llm:judge-7b" and result["mean_reward_sft"] is None
    assert PLANTED_KEY not in json.dumps(result)


def test_a_position_biased_judge_cancels_out():
    with JudgeServer(position_biased=True) as server:
        result = judges.llm_judge(_config(server.url), ["p1", "p2", "p3"], ["a", "b", "c"], ["aa", "bb", "cc"], seed=0)
    assert server.auth == [None] * 6  # no key configured, none sent
    assert result["win_rate"] == 0.5 and result["ties"] == 3 and result["inconsistent"] == 3


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_endpoint_that_does_not_answer_is_a_clear_error():
    with pytest.raises(LexAlignError) as err:
        judges.llm_judge(_config(f"http://127.0.0.1:{_closed_port()}/v1"), ["p"], ["a"], ["b"], seed=0)
    assert "evaluate.llm_judge.base_url" in err.value.render() and "did not answer" in err.value.message
    with JudgeServer() as server, pytest.raises(LexAlignError, match="HTTP 404") as err:
        judges.llm_judge(_config(server.url.removesuffix("/v1")), ["p"], ["a"], ["b"], seed=0)
    assert "evaluate.llm_judge.base_url" in err.value.render()


def test_a_missing_key_variable_is_named_not_guessed(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(LexAlignError, match="NO_SUCH_JUDGE_KEY") as err:
        judges.llm_judge(_config("http://127.0.0.1:9/v1", api_key_env="NO_SUCH_JUDGE_KEY"), ["p"], ["a"], ["b"], 0)
    assert "evaluate.llm_judge.api_key_env" in err.value.render()


# --- the evaluate step: samples, lengths, judges, and nothing half-written --------------------------


@pytest.fixture(scope="module")
def validated(tmp_path_factory, demo_model_dir):
    from lexalign.demo import task

    root = tmp_path_factory.mktemp("judged")
    raw = root / "raw" / "train.jsonl"
    raw.parent.mkdir()
    raw.write_text("".join(json.dumps(row) + "\n" for row in task.preference_rows(0, 120)))
    inputs.validate(raw=raw, tokenizer=demo_model_dir, output=root / "data",
                    dataset={"eval_fraction": 0.3, "max_length": 64})
    return root / "data"


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, demo_model_dir):
    """A tiny random-weight sequence-classification reward model (one label) with the demo's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("reward-model")
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _evaluate(validated, demo_model_dir, sft_model_dir, output, reward_model=None, reward_model_source=None,
              **settings):
    """The evaluate step with the SFT model as the aligned one and the demo's base model as the reference."""
    if reward_model_source:
        settings["reward_model"] = reward_model_source
    return results.evaluate(aligned=sft_model_dir, reference=demo_model_dir, data=validated, output=output, beta=0.1,
                           reward_model=reward_model,
                           evaluate={"num_prompts": 6, "num_samples": 4, "max_new_tokens": 8, "batch_size": 4,
                                     **settings})


def test_reward_model_judge_scores_both_answers_to_each_held_out_prompt(validated, demo_model_dir, sft_model_dir,
                                                                         reward_model_dir, tmp_path):
    from lexalign.models.loading import load_reward_model

    result = _evaluate(validated, demo_model_dir, sft_model_dir, tmp_path / "eval.json", reward_model=[str(
        reward_model_dir)], judge="reward_model", reward_model_source={"path": str(reward_model_dir)})
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    # Samples: greedy answers of both models to the same held-out prompts.
    assert len(saved["samples"]) == 4 and set(saved["samples"][0]) == {"prompt", "sft", "aligned"}
    assert saved["decoding"]["strategy"] == "greedy" and saved["decoding"]["prompts"] == 6
    length = saved["length"]
    assert length["n"] == 6 and 0 < length["sft_mean_tokens"] <= 8 and 0 < length["aligned_mean_tokens"] <= 8
    assert length["ratio"] == pytest.approx(length["aligned_mean_tokens"] / length["sft_mean_tokens"])
    judge = saved["judge"]
    assert set(judge) >= {"name", "win_rate", "ci_low", "ci_high", "ties", "n", "mean_reward_sft",
                          "mean_reward_aligned"}
    assert judge["n"] == 6 and judge["ci_low"] <= judge["win_rate"] <= judge["ci_high"]
    assert judge["name"] == f"reward_model:{reward_model_dir}"
    # The rewards are the model's own scores of prompt + answer, one text at a time (padding changes nothing).
    import torch

    model, tokenizer = load_reward_model(reward_model_dir, "cpu")
    prompt, answer = saved["samples"][0]["prompt"], saved["samples"][0]["aligned"]
    with torch.no_grad():
        alone = model(**tokenizer(prompt + answer, return_tensors="pt")).logits[0, 0].item()
    batched = judges.reward_scores(model, tokenizer, [prompt, "User: hi\nAssistant:"], [answer, " a longer answer"],
                                   chat=False, batch_size=2)
    assert batched[0] == pytest.approx(alone, abs=1e-5)


def test_a_causal_lm_as_reward_model_is_refused_by_name(demo_model_dir):
    from lexalign.models.loading import load_reward_model

    with pytest.raises(LexAlignError, match="evaluate.reward_model is not a sequence-classification") as err:
        load_reward_model(demo_model_dir, "cpu")
    assert "LlamaForCausalLM" in err.value.render()


def test_the_llm_judge_key_never_reaches_the_output_or_the_terminal(validated, demo_model_dir, sft_model_dir,
                                                                     tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("JUDGE_KEY", PLANTED_KEY)
    with JudgeServer() as server:
        result = _evaluate(validated, demo_model_dir, sft_model_dir, tmp_path / "eval.json", judge="llm",
                           llm_judge=_config(server.url, api_key_env="JUDGE_KEY"))
    assert set(server.auth) == {f"Bearer {PLANTED_KEY}"} and server.requests == 12
    assert result["judge"]["n"] == 6 and result["judge"]["asked"] == 12
    captured = capfd.readouterr()
    assert "Win rate against the SFT model (llm:judge-7b, 6 prompts)" in captured.out
    assert PLANTED_KEY not in (tmp_path / "eval.json").read_text() + captured.out + captured.err


def test_a_judge_that_fails_leaves_no_eval_json(validated, demo_model_dir, sft_model_dir, tmp_path):
    output = tmp_path / "eval.json"
    # Nothing listens: found before any model is loaded.
    with pytest.raises(LexAlignError, match="did not answer"):
        _evaluate(validated, demo_model_dir, sft_model_dir, output, judge="llm",
                  llm_judge=_config(f"http://127.0.0.1:{_closed_port()}/v1"))
    # The endpoint gives up half-way through (HTTP 429 after 3 answers): the json is still not written.
    with JudgeServer(limit=3) as server, pytest.raises(LexAlignError, match="HTTP 429"):
        _evaluate(validated, demo_model_dir, sft_model_dir, output, judge="llm", llm_judge=_config(server.url))
    assert server.requests > 3
    assert not output.exists() and not list(tmp_path.glob(".eval.json*"))


@pytest.mark.parametrize("settings, key", [
    ({"judge": "reward_model"}, "evaluate.reward_model"),
    ({"judge": "llm", "llm_judge": {"model": "m"}}, "evaluate.llm_judge.base_url"),
    ({"judge": "llm", "llm_judge": {"base_url": "http://x/v1"}}, "evaluate.llm_judge.model"),
])
def test_a_judge_without_its_settings_is_refused_by_name(settings, key):
    from lexalign.config.sections import EvaluateConfig

    with pytest.raises(LexAlignError, match=re.escape(key)):
        EvaluateConfig.from_dict(settings)
