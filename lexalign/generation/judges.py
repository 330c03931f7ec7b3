"""Judges: for each held-out prompt, is the aligned model's answer better than the SFT model's?

Every judge gives one score per prompt, from the aligned model's side: 1 (its
answer wins), 0.5 (a tie) or 0 (the SFT answer wins); the LLM judge, asked in
both orders, averages the two (so 0.25 and 0.75 occur). The win rate is their
mean (ties count half), with a seeded bootstrap 95% interval over prompts:

- `demo`: the demo task's rule (a polite greeting scores 1, anything else 0);
- `reward_model`: a sequence-classification reward model scores both answers;
- `llm`: a pairwise judge behind an OpenAI-compatible chat endpoint, asked
  twice per prompt (SFT answer first, then aligned first) to cancel position
  bias; an answer without a verdict counts as a tie and is counted.

The result has one shape for every judge: `{name, win_rate, ci_low, ci_high,
ties, wins, losses, n, mean_reward_sft, mean_reward_aligned}` (the LLM judge
has no rewards: null there, and `unparseable` / `inconsistent` counts instead).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lexalign.core.errors import LexAlignError
from lexalign.core.intervals import bootstrap_interval
from lexalign.core.shares import chunks

TIE_TOLERANCE = 1e-6
"""Rewards closer than this are a tie (identical answers get identical rewards)."""


def summarise(name: str, scores: list[float], seed: int, rewards: tuple[list, list] | None = None,
              **extra) -> dict:
    """The judge block of the eval json from per-prompt scores (1 aligned wins, 0.5 tie, 0 SFT wins)."""
    n = len(scores)
    low, high = bootstrap_interval(scores, seed)
    out = {
        "name": name,
        "n": n,
        "win_rate": sum(scores) / n if n else None,
        "ci_low": low,
        "ci_high": high,
        "wins": sum(s > 0.5 for s in scores),
        "ties": sum(s == 0.5 for s in scores),
        "losses": sum(s < 0.5 for s in scores),
        "mean_reward_sft": None,
        "mean_reward_aligned": None,
        **extra,
    }
    if rewards is not None and n:
        out["mean_reward_sft"] = sum(rewards[0]) / n
        out["mean_reward_aligned"] = sum(rewards[1]) / n
    return out


def compare(sft: float, aligned: float) -> float:
    """The aligned answer's score against the SFT answer's, from their rewards."""
    if abs(aligned - sft) <= TIE_TOLERANCE:
        return 0.5
    return 1.0 if aligned > sft else 0.0


def from_rewards(name: str, sft: list[float], aligned: list[float], seed: int, **extra) -> dict:
    return summarise(name, [compare(s, a) for s, a in zip(sft, aligned, strict=True)], seed, (sft, aligned),
                     **extra)


# --- demo -------------------------------------------------------------------------------------------


def demo_judge(sft: list[str], aligned: list[str], seed: int) -> dict:
    """The demo's rule: a polite greeting scores 1."""
    from lexalign.demo import task

    return from_rewards("demo-polite-greeting", [float(task.judge(a)) for a in sft],
                        [float(task.judge(a)) for a in aligned], seed)


# --- reward model -----------------------------------------------------------------------------------


def reward_scores(model, tokenizer, prompts: list[str], answers: list[str], chat: bool, batch_size: int,
                  batches: list[list[int]] | None = None) -> list[float | None]:
    """The reward model's score of each prompt + answer, as the policy saw the prompt (chat-rendered texts are
    encoded with no special tokens added, plain text with the tokenizer's own), `batch_size` at a time in order.
    `batches`: only these (a process's share, `lexalign.core.shares`); the other answers' scores are None."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    limit = min(int(getattr(tokenizer, "model_max_length", 0) or 0) or 1 << 30, 1 << 16)
    out: list[float | None] = [None] * len(prompts)
    for batch in chunks(len(prompts), batch_size) if batches is None else batches:
        encoded = tokenizer([prompts[i] + answers[i] for i in batch], add_special_tokens=not chat)["input_ids"]
        encoded = [ids[-limit:] for ids in encoded]  # keep the answer when a text is too long
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[row, : len(ids)] = 1
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        for i, value in zip(batch, logits[:, 0].float().tolist(), strict=True):
            out[i] = value
    return out


def reward_model_rewards(model_dir: str | Path, prompts: list[str], sft: list, aligned: list, chat: bool,
                         batch_size: int, device: str, batches: list[list[int]] | None = None) -> tuple[list, list]:
    """The reward model's scores of the SFT and the aligned answers (of `batches` only, when given)."""
    from lexalign.models.loading import load_reward_model

    model, tokenizer = load_reward_model(model_dir, device, key="evaluate.reward_model")
    return (reward_scores(model, tokenizer, prompts, sft, chat, batch_size, batches),
            reward_scores(model, tokenizer, prompts, aligned, chat, batch_size, batches))


def reward_model_judge(model_dir: str | Path, prompts: list[str], sft: list[str], aligned: list[str], chat: bool,
                       batch_size: int, device: str, seed: int, label: str | None = None,
                       rewards: tuple[list, list] | None = None) -> dict:
    """The judge block from the reward model's scores (`rewards`: already computed, by the processes of a
    evaluation in several processes)."""
    rewards = rewards or reward_model_rewards(model_dir, prompts, sft, aligned, chat, batch_size, device)
    return from_rewards(f"reward_model:{label or Path(model_dir).name}", *rewards, seed)


# --- LLM judge (OpenAI-compatible chat endpoint) ----------------------------------------------------

SYSTEM_PROMPT = ("You are an impartial judge. You compare two answers to the same user prompt and decide which "
                 "one is more helpful, correct and appropriate. Length alone is no merit.")
JUDGE_PROMPT = """[User prompt]
{prompt}

[The start of answer A]
{a}
[The end of answer A]

[The start of answer B]
{b}
[The end of answer B]

Which answer is better? Explain briefly, then end your reply with the verdict: [[A]] if answer A is better, \
[[B]] if answer B is better, [[C]] for a tie."""
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)
REQUESTS_AT_ONCE = 4
MAX_TOKENS = 512


def parse_verdict(reply: str | None) -> str | None:
    """A, B or C (tie) from the judge's reply: its last [[X]], or a bare A / B / C / tie; None if neither."""
    if not reply:
        return None
    found = _VERDICT.findall(reply)
    if found:
        return found[-1].upper()
    bare = reply.strip().strip(".").strip().upper()
    return {"A": "A", "B": "B", "C": "C", "TIE": "C"}.get(bare)


class _Endpoint:
    """One OpenAI-compatible /chat/completions endpoint. The key stays in this object: never printed, logged,
    written or put in an error (any text shown is scrubbed of it)."""

    def __init__(self, cfg: dict):
        self.base_url = str(cfg["base_url"]).rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = cfg["model"]
        self.timeout = float(cfg.get("timeout") or 60)
        self.key_env = cfg.get("api_key_env")
        self._key = None
        if self.key_env:
            self._key = os.environ.get(self.key_env)
            if not self._key:
                raise LexAlignError(f'The LLM judge\'s API key variable "{self.key_env}" is not set',
                                    "evaluate.llm_judge.api_key_env names an environment variable that is empty here",
                                    hint=f"export {self.key_env}=… before running, or set "
                                         "evaluate.llm_judge.api_key_env: null for an endpoint without a key")
        if not self.url.startswith(("http://", "https://")):
            raise LexAlignError(f'evaluate.llm_judge.base_url "{self.base_url}" is not an http(s) URL',
                                hint="Use e.g. http://localhost:8000/v1 (vLLM) or http://localhost:11434/v1 (Ollama)")

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def ask(self, prompt: str) -> str | None:
        import urllib.error
        import urllib.request

        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": MAX_TOKENS,
                           "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - the user's URL
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = self._scrub(err.read()[:300].decode("utf-8", "replace"))
            if err.code in (401, 403):
                raise LexAlignError(f"The LLM judge at {self.base_url} refused the request (HTTP {err.code})",
                                    detail, hint=f"Check the key in ${self.key_env} (evaluate.llm_judge.api_key_env)"
                                    if self.key_env else "Set evaluate.llm_judge.api_key_env to the variable "
                                    "holding the endpoint's key") from None
            raise LexAlignError(f"The LLM judge at {self.base_url} answered HTTP {err.code}", detail,
                                f'model: "{self.model}" (evaluate.llm_judge.model)',
                                hint="Check evaluate.llm_judge.base_url (up to /v1) and evaluate.llm_judge.model"
                                ) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise LexAlignError(f'The LLM judge at "{self.base_url}" did not answer (evaluate.llm_judge.base_url)',
                                self._scrub(f"{type(reason).__name__}: {reason}"),
                                hint="Start the server (vLLM, Ollama, llama.cpp) or fix evaluate.llm_judge.base_url; "
                                     "a slow one needs a larger evaluate.llm_judge.timeout") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LexAlignError(f"The LLM judge at {self.base_url} answered something that is not a chat completion",
                                self._scrub(raw[:300].decode("utf-8", "replace")),
                                hint="evaluate.llm_judge.base_url must be an OpenAI-compatible endpoint (up to /v1)"
                                ) from None


    def check_reachable(self) -> None:
        """Fail in a second, before any model is loaded, when nothing listens at the endpoint's host and port."""
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=min(self.timeout, 10)).close()
        except OSError as err:
            raise LexAlignError(f'The LLM judge at "{self.base_url}" did not answer (evaluate.llm_judge.base_url)',
                                f"{type(err).__name__}: {err}",
                                hint="Start the server (vLLM, Ollama, llama.cpp) or fix evaluate.llm_judge.base_url"
                                ) from None


def llm_judge(cfg: dict, prompts: list[str], sft: list[str], aligned: list[str], seed: int) -> dict:
    """Each pair asked twice: A = SFT, B = aligned, then A = aligned, B = SFT."""
    from concurrent.futures import ThreadPoolExecutor

    endpoint = _Endpoint(cfg)
    questions = [JUDGE_PROMPT.format(prompt=p, a=s, b=a) for p, s, a in zip(prompts, sft, aligned, strict=True)]
    questions += [JUDGE_PROMPT.format(prompt=p, a=a, b=s) for p, s, a in zip(prompts, sft, aligned, strict=True)]
    with ThreadPoolExecutor(REQUESTS_AT_ONCE) as pool:
        verdicts = [parse_verdict(reply) for reply in pool.map(endpoint.ask, questions)]
    n = len(prompts)
    first, second = verdicts[:n], verdicts[n:]
    aligned_first = {"A": 1.0, "B": 0.0}
    scores = [({"B": 1.0, "A": 0.0}.get(v1, 0.5) + aligned_first.get(v2, 0.5)) / 2
              for v1, v2 in zip(first, second, strict=True)]
    inconsistent = sum(v1 in ("A", "B") and v1 == v2 for v1, v2 in zip(first, second, strict=True))
    return summarise(f"llm:{endpoint.model}", scores, seed, unparseable=sum(v is None for v in verdicts),
                     inconsistent=inconsistent, asked=len(questions))


# --- verifiable rewards: IFEval's checkers, a reward function of the user's ----------------------------


def ifeval_judge(rows: list[dict], sft: list[str], aligned: list[str], seed: int, nltk_data=None) -> dict:
    """IFEval's checkers on both models' answers to prompts in IFEval's format: per prompt, the aligned answer
    wins when it follows a larger share of the prompt's instructions (strict); beside the win rate, IFEval's four
    figures of each model with their intervals, and the paired difference of the prompt-level strict accuracy
    (aligned − SFT, each prompt's two answers resampled together)."""
    from lexalign.generation import ifeval

    ifeval.load_registry(nltk_data)
    shares = {name: [ifeval.score(row, answer) for row, answer in zip(rows, answers, strict=True)]
              for name, answers in (("sft", sft), ("aligned", aligned))}
    strict = {name: [v.strict for v in verdicts] for name, verdicts in shares.items()}
    followed = {name: [float(v == 1.0) for v in values] for name, values in strict.items()}
    difference = [a - s for s, a in zip(followed["sft"], followed["aligned"], strict=True)]
    low, high = bootstrap_interval(difference, seed)
    return from_rewards("ifeval", strict["sft"], strict["aligned"], seed, ifeval={
        "sft": ifeval.figures(rows, sft, seed), "aligned": ifeval.figures(rows, aligned, seed),
        "prompt_level_strict_difference": {"value": sum(difference) / max(len(difference), 1), "ci_low": low,
                                           "ci_high": high},
        "loose_mean_sft": _mean([v.loose for v in shares["sft"]]),
        "loose_mean_aligned": _mean([v.loose for v in shares["aligned"]])})


def python_judge(reference: str, prompts: list, sft: list[str], aligned: list[str], fields: list[dict],
                 seed: int, base_dir: str | Path | None = None) -> dict:
    """The user's reward function (TRL's signature) on both models' answers; the aligned answer wins when it
    scores higher. A prompt either answer has no score for (None) counts as a tie."""
    from lexalign.generation import reward_functions

    fn = reward_functions.load(reference, base_dir, key="evaluate.judge.python")
    columns = reward_functions.row_fields(fields) if fields else {}
    scores = {name: reward_functions.call(fn, prompts, answers, columns)
              for name, answers in (("sft", sft), ("aligned", aligned))}
    pairs = [(s, a) if s is not None and a is not None else (0.0, 0.0)
             for s, a in zip(scores["sft"], scores["aligned"], strict=True)]
    return from_rewards(f"python:{reference}", [s for s, _ in pairs], [a for _, a in pairs], seed,
                        unscored=sum(s is None or a is None for s, a in zip(scores["sft"], scores["aligned"],
                                                                          strict=True)))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def check(cfg, reward_model: str | Path | None = None) -> None:
    """The judge's settings, checked before any model is loaded or answer generated: the reward model is a
    sequence-classification model; the LLM endpoint's key variable is set and something listens there; the
    user's reward function loads; IFEval's checkers import (offline)."""
    if cfg.judge == "reward_model":
        from lexalign.models.loading import check_reward_model

        if not reward_model:
            raise LexAlignError('evaluate.judge is "reward_model" but no reward model was given to evaluate',
                                hint="Set evaluate.reward_model (repo_id or path)")
        check_reward_model(reward_model, key="evaluate.reward_model")
    elif cfg.judge == "llm":
        _Endpoint(cfg.llm_judge).check_reachable()
    elif cfg.judge == "ifeval":
        from lexalign.generation import ifeval

        ifeval.load_registry(cfg.ifeval.get("nltk_data"))
    elif isinstance(cfg.judge, dict):
        from lexalign.generation import reward_functions

        reward_functions.load(cfg.judge["python"], key="evaluate.judge.python")


def judge(cfg, prompts: list[str], sft: list[str], aligned: list[str], chat: bool, seed: int,
          reward_model: str | Path | None = None, device: str = "cpu", rewards: tuple[list, list] | None = None,
          rows: list[dict] | None = None) -> dict | None:
    """The judge block for `cfg.judge` (an EvaluateConfig), or None with judge none. `rewards`: the reward
    model's scores of both answers, when the processes of an evaluation in several processes computed them
    already. `rows`: each prompt's row as its source gives it (the prompt as written and its other fields: IFEval's
    instructions, a reward function's keyword arguments)."""
    if cfg.judge == "demo":
        return demo_judge(sft, aligned, seed)
    if cfg.judge == "reward_model":
        if not reward_model:
            raise LexAlignError('evaluate.judge is "reward_model" but no reward model was given to evaluate',
                                hint="Set evaluate.reward_model (repo_id or path)")
        label = cfg.reward_model.get("repo_id") or cfg.reward_model.get("path")
        return reward_model_judge(reward_model, prompts, sft, aligned, chat, cfg.batch_size, device, seed, label,
                                  rewards)
    if cfg.judge == "llm":
        return llm_judge(cfg.llm_judge, prompts, sft, aligned, seed)
    if cfg.judge == "ifeval":
        if not rows or any("instruction_id_list" not in row for row in rows):
            raise LexAlignError("judge ifeval reads prompts in IFEval's format (prompt, instruction_id_list, kwargs)",
                                "These prompts have no instruction_id_list",
                                hint="Give evaluate.ifeval.prompts (the evaluate step), or online prompts from: "
                                     "instructions (or a file in IFEval's format)")
        return ifeval_judge(rows, sft, aligned, seed, cfg.ifeval.get("nltk_data"))
    if isinstance(cfg.judge, dict):
        fields = [{k: v for k, v in row.items() if k != "prompt"} for row in rows] if rows else []
        originals = [row.get("prompt", text) for row, text in zip(rows, prompts, strict=True)] if rows else prompts
        return python_judge(cfg.judge["python"], originals, sft, aligned, fields, seed)
    return None
