"""Score every sampled completion with one of the evaluate step's judges, each score asked once.

The judges (`lexalign.generation.judges`) compare two answers at evaluation; a round needs
one score per completion:

- `demo`: the demo task's rule (1 for a polite greeting, else 0);
- `reward_model`: the sequence-classification model's score
  (`judges.reward_scores`), loaded only when some score is missing;
- `llm`: the endpoint (`judges._Endpoint`, key handling and errors included)
  rates each answer from 1 to 10 (`[[N]]`), shown the prompt as the user gave
  it (the generations' `question`), not the policy's chat-template text; a reply without a rating is None
  (unscored: selection leaves it out and counts it). At most
  `judges.REQUESTS_AT_ONCE` requests at once, each retried `retries` times
  after a failure other than a refusal.

Every score is cached under (policy hash, prompt, completion ids, judge) in an
append-only JSONL file, a batch's scores appended and fsynced as soon as they
are known, so a rerun asks only for what is missing, and a judge that fails
mid-round (a dead endpoint, a reward model that does not load) stops with a
LexAlignError that keeps every score finished before it. Batches are sorted
by length, so a reward model pads little.

The reward model's batches can be dealt over the processes of a launch
(`scale.score`, `lexalign.core.shares`): each process asks for every N-th batch of
the scores missing from the cache and caches them in its own file beside it;
the main process gathers every score, folds those files into the cache and
writes what one process writes. The demo and LLM judges score in one process
(the LLM judge already sends `judges.REQUESTS_AT_ONCE` requests at once).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from lexalign.core.errors import LexAlignError

RATING_PROMPT = """[User prompt]
{prompt}

[The start of the answer]
{answer}
[The end of the answer]

Rate how helpful, correct and appropriate the answer is, from 1 (worst) to 10 (best). Length alone is no merit. \
Explain briefly, then end your reply with the rating in double brackets, e.g. [[7]]."""
RATING_VERSION = 1
"""Part of the LLM judge's cache identity: a new prompt is a new judge."""
_RATING = re.compile(r"\[\[\s*(10|[1-9])(?:\.0+)?\s*\]\]")


def parse_rating(reply: str | None) -> float | None:
    """The last [[N]] (1-10) of the judge's reply, or None."""
    found = _RATING.findall(reply or "")
    return float(found[-1]) if found else None


class JudgeFailed(Exception):
    """A judge failed part-way through a batch: `done` holds the positions it scored before failing."""

    def __init__(self, error: LexAlignError, done: dict[int, float | None]):
        super().__init__(error.message)
        self.error = error
        self.done = done


class DemoJudge:
    name = "demo"

    def score(self, prompts: list[str], answers: list[str]) -> list[float | None]:
        from lexalign.demo import task

        return [float(task.judge(a)) for a in answers]


class RewardModelJudge:
    """The reward model at `path`, loaded on the first batch that needs it (never, on a fully cached rerun)."""

    def __init__(self, path: str | Path, chat: bool, device: str = "cpu", batch_size: int = 16):
        from lexalign.core import io

        self.path, self.chat, self.device, self.batch_size = Path(path), chat, device, batch_size
        self.name = f"reward_model:{io.hash_path(self.path)}"
        self._loaded = None

    def score(self, prompts: list[str], answers: list[str]) -> list[float | None]:
        from lexalign.generation.judges import reward_scores
        from lexalign.models.loading import load_reward_model

        if self._loaded is None:
            self._loaded = load_reward_model(self.path, self.device, key="online.judge.reward_model")
        model, tokenizer = self._loaded
        return reward_scores(model, tokenizer, prompts, answers, self.chat, self.batch_size)


class LlmJudge:
    reads = "question"  # the prompt as the user gave it, not the policy's chat-template text

    def __init__(self, cfg: dict, retries: int = 2, backoff: float = 1.0):
        from lexalign.generation.judges import _Endpoint

        self.endpoint = _Endpoint(cfg)
        self.endpoint.check_reachable()  # a dead endpoint fails in a second, not after every request's retries
        self.retries, self.backoff = retries, backoff
        # The judge is the model and the prompt, not where it is served: a server restarted on another port
        # keeps its cached scores.
        self.name = f"llm:{self.endpoint.model}:v{RATING_VERSION}"

    def _ask(self, prompt: str, answer: str) -> float | None:
        question = RATING_PROMPT.format(prompt=prompt, answer=answer)
        for attempt in range(self.retries + 1):
            try:
                return parse_rating(self.endpoint.ask(question))
            except LexAlignError as err:
                if attempt == self.retries or "refused" in err.message:  # a wrong key does not heal by retrying
                    raise
                time.sleep(self.backoff * (attempt + 1))
        return None  # unreachable: the loop returns or raises

    def score(self, prompts: list[str], answers: list[str]) -> list[float | None]:
        from concurrent.futures import ThreadPoolExecutor

        from lexalign.generation.judges import REQUESTS_AT_ONCE

        done: dict[int, float | None] = {}
        failure = None
        with ThreadPoolExecutor(REQUESTS_AT_ONCE) as pool:
            futures = [pool.submit(self._ask, p, a) for p, a in zip(prompts, answers, strict=True)]
            for i, future in enumerate(futures):
                try:
                    done[i] = future.result()
                except LexAlignError as err:
                    failure = failure or err
        if failure is not None:
            raise JudgeFailed(failure, done)
        return [done[i] for i in range(len(answers))]


def score_key(policy_hash: str, prompt: str, completion_ids: list[int], judge: str) -> str:
    return hashlib.sha256(json.dumps([policy_hash, prompt, list(completion_ids), judge]).encode()).hexdigest()


class ScoreCache:
    """Append-only JSONL of {"key", "score"}; a torn last line (a kill mid-write) is ignored.

    In a launched step (`rank` > 0) a process appends to its own file beside the cache (`part_path`: one writer
    per file, on a shared filesystem too); every reader reads those files as well, so a score is never asked
    twice whichever process of whichever attempt cached it, and the main process folds them into the cache
    once every process is done (`fold`)."""

    def __init__(self, path: str | Path, rank: int = 0):
        self.path = Path(path)
        self.scores: dict[str, float | None] = {}
        self.folded: set[str] = set()
        """The keys in the cache file itself."""
        self.folded.update(self._read(self.path))
        for part in self.parts():
            self._read(part)
        self.writes_to = self.path if rank == 0 else self.part_path(rank)

    def part_path(self, rank: int) -> Path:
        return self.path.parent / f".{self.path.name}.part-{rank}.jsonl"

    def parts(self) -> list[Path]:
        """The other processes' files (of this attempt or an earlier, killed one)."""
        return sorted(self.path.parent.glob(f".{self.path.name}.part-*.jsonl"))

    def _read(self, path: Path) -> list[str]:
        found = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.scores[entry["key"]] = entry["score"]
                    found.append(entry["key"])
                except (ValueError, KeyError, TypeError):
                    continue
        return found

    def put(self, scores: dict[str, float | None]) -> None:
        if not scores:
            return
        self.writes_to.parent.mkdir(parents=True, exist_ok=True)
        with self.writes_to.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps({"key": k, "score": v}) + "\n" for k, v in scores.items()))
            handle.flush()
            os.fsync(handle.fileno())
        self.scores.update(scores)
        if self.writes_to == self.path:
            self.folded.update(scores)

    def fold(self) -> int:
        """The main process, once no other writes: the other processes' files into the cache, then removed.
        Returns how many scores were added."""
        parts = self.parts()
        found: dict[str, float | None] = {}
        for part in parts:
            for key in self._read(part):
                if key not in self.folded:
                    found[key] = self.scores[key]
        self.put(found)
        for part in parts:
            part.unlink(missing_ok=True)
        return len(found)


def score_completions(rows: list[dict], judge, cache_path: str | Path, batch_size: int = 32, share=None
                      ) -> tuple[list[list[float | None]], dict] | None:
    """(K scores for each generations row, counts): the cached ones read, the missing ones asked in
    length-sorted batches and cached batch by batch.

    `share` (a launched step, scale.score: lexalign.core.shares): every process plans the same batches of the scores
    missing from the cache and asks the judge for every N-th of them (each caching its own: `ScoreCache`); the
    main process gathers them, folds the processes' cache files into the cache and returns what one process
    returns; the others return None."""
    from lexalign.core.shares import Share, chunks, piece

    share = share or Share()
    cache = ScoreCache(cache_path, share.rank)
    share.barrier()  # every process has read the cache before any writes to it: they plan the same batches
    reads = getattr(judge, "reads", "prompt")  # the reward model reads the rendered prompt, as evaluate gives it
    items = [(score_key(r["policy_hash"], r["prompt"], ids, judge.name), r.get(reads) or r["prompt"], text,
              len(r["prompt_ids"]) + len(ids))
             for r in rows for ids, text in zip(r["completion_ids"], r["completions"], strict=True)]
    missing = {key: item for key, *item in items if key not in cache.scores}
    order = sorted(missing, key=lambda key: missing[key][2])
    mine = share.take(chunks(len(order), batch_size))
    found: list[float | None] = [None] * len(order)
    asked = 0
    for batch in mine:
        keys = [order[i] for i in batch]
        try:
            scores = judge.score([missing[k][0] for k in keys], [missing[k][1] for k in keys])
        except JudgeFailed as failed:
            cache.put({keys[i]: s for i, s in failed.done.items()})
            kept = len(cache.scores)
            raise LexAlignError(f"The judge ({judge.name.split(':')[0]}) failed before the round's scores were all "
                                "finished",
                                failed.error.message, *failed.error.details,
                                f"{asked + len(failed.done)} scores finished in this run; every finished score is "
                                f"kept in {cache.writes_to} ({kept} in all) and is not asked again",
                                hint=failed.error.hint or "Fix the judge and rerun: only the missing scores are asked"
                                ) from None
        except LexAlignError as err:  # a reward model that does not load: nothing of this batch was scored
            raise LexAlignError(err.message, *err.details, f"{asked} scores finished in this run are kept in "
                                f"{cache.writes_to}", hint=err.hint) from None
        cache.put(dict(zip(keys, scores, strict=True)))
        for i, value in zip(batch, scores, strict=True):
            found[i] = value
        asked += len(keys)
    gathered = share.gather({"scores": piece(mine, found)}, {"scores": len(order)})
    if gathered is None:
        return None  # not the main process: it returns every score
    cache.scores.update(zip(order, gathered["scores"], strict=True))
    cache.fold()
    grouped, position = [], 0
    for r in rows:
        k = len(r["completion_ids"])
        grouped.append([cache.scores[key] for key, *_ in items[position:position + k]])
        position += k
    flat = [s for group in grouped for s in group]
    return grouped, {"judge": judge.name, "completions": len(flat), "asked": len(order),
                     "cached": len(flat) - len(order), "unscored": sum(s is None for s in flat)}


class IfevalJudge:
    """IFEval's checkers (lexalign.generation.ifeval): a completion's score is the share of its prompt's
    instructions it follows, strict. The prompts' instructions come with them (the rounds' prompts.json)."""

    reads = "question"

    def __init__(self, fields: dict[str, dict], nltk_data=None):
        from importlib.metadata import version

        from lexalign.generation import ifeval

        ifeval.load_registry(nltk_data)
        self.fields = fields
        self.name = f"ifeval-strict:lm-eval-{version('lm-eval')}"

    def score(self, prompts: list[str], answers: list[str]) -> list[float | None]:
        from lexalign.generation import ifeval

        out = []
        for prompt, answer in zip(prompts, answers, strict=True):
            row = self.fields.get(prompt)
            if not row or "instruction_id_list" not in row:
                raise LexAlignError("online.judge ifeval scores prompts in IFEval's format, and this one has no "
                                    "instruction_id_list", f"Prompt: {prompt[:120]!r}",
                                    hint="Use prompts from: instructions, or a prompt file with instruction_id_list "
                                         "and kwargs fields")
            out.append(ifeval.score({"prompt": prompt, **row}, answer).strict)
        return out


class PythonJudge:
    """The user's reward function (lexalign.generation.reward_functions), TRL's signature: the prompts as given,
    the completions, and each prompt row's other fields as keyword lists. Its cache identity holds the file's
    content, so an edited function scores again, and a scored completion under the same file is never asked again."""

    reads = "question"

    def __init__(self, reference: str, fields: dict[str, dict]):
        import hashlib

        from lexalign.generation import reward_functions

        path, function = reward_functions.parse_reference(reference, key="online.judge.python")
        self.fn = reward_functions.load(reference, key="online.judge.python")
        self.fields = fields
        self.name = f"python:{path.name}:{function}:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"

    def score(self, prompts: list[str], answers: list[str]) -> list[float | None]:
        from lexalign.generation import reward_functions

        columns = reward_functions.row_fields([self.fields.get(p, {}) for p in prompts])
        return reward_functions.call(self.fn, prompts, answers, columns if any(columns.values()) else None)


def make_judge(judge: str | dict, chat: bool, reward_model, llm_judge: dict, device: str,
               fields: dict[str, dict] | None = None, nltk_data=None):
    """The online judge `judge` (online.judge) that scores each completion: the demo's rule, a reward model, an
    LLM at an OpenAI-compatible endpoint (evaluate.llm_judge), IFEval's checkers, or the user's reward function.
    `fields`: each prompt's other fields by the prompt as given (the rounds' prompts.json)."""
    if isinstance(judge, dict):
        return PythonJudge(judge["python"], fields or {})
    if judge == "demo":
        return DemoJudge()
    if judge == "reward_model":
        from lexalign.models.loading import resolve_device

        return RewardModelJudge(reward_model, chat, resolve_device(device))
    if judge == "ifeval":
        return IfevalJudge(fields or {}, nltk_data)
    return LlmJudge(llm_judge)
