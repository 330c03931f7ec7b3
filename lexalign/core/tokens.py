"""Text to token ids: the one place that decides which special tokens a sequence gets.

Every step that turns a prompt and a response into ids (validation's length
check, the reference step, DPO and GDPO training, evaluation's scoring and its
generation) goes through here, so they all see the same tokens.

Two kinds of data, one rule each:

- **chat** (`chat=True`): the texts were rendered by the model's own chat
  template (validation renders conversations: the prompt with the generation
  prompt, each response as the rest of the finished conversation). The template
  already wrote every special token it wants (Llama-3's and Gemma's BOS, the
  end-of-turn token the model must learn to stop on), so the texts are encoded
  with no special tokens added and nothing appended. The ids are then exactly
  `tokenizer.apply_chat_template(messages, tokenize=True)`'s, which renders and
  encodes the same way. Encoding them with the tokenizer's defaults instead adds
  a second BOS on every template that writes one.
- **plain** (`chat=False`): raw text on a base model. The tokenizer's own
  prefix (BOS, where it adds one) once before the prompt, and EOS once after
  each response, unless the response already ends with it.

The completion starts where the prompt's ids and the prompt + response's ids
first differ (TRL's `common_prefix_length`): a token merging across the
boundary belongs to the completion.
"""

from __future__ import annotations

import contextlib
import os

PARALLEL_MIN_TEXTS = 4096
"""Below this many texts a batch is encoded on one core (threads cost more than they save)."""
_PROBE = "a"


@contextlib.contextmanager
def _tokenizer_threads(enabled: bool):
    """Let the Rust tokenizer encode a batch on every core (TOKENIZERS_PARALLELISM is read per call)."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    if enabled:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        # Set (to false) afterwards, so a later fork does not warn that parallelism was used.
        os.environ["TOKENIZERS_PARALLELISM"] = previous if previous is not None else "false"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _encode_chunk(args) -> list[list[int]]:
    tokenizer, texts = args
    return tokenizer(text=texts, add_special_tokens=False)["input_ids"]


def encode(tokenizer, texts: list[str], workers: int | None = None, chunk: int = 65536) -> list[list[int]]:
    """The ids of each text with no special tokens added, in batches.

    A fast tokenizer encodes each batch in Rust, on every core for large batches;
    a slow (Python) one is spread over worker processes when there are many texts.
    """
    if not texts:
        return []
    workers = workers or available_cores()
    if getattr(tokenizer, "is_fast", False):
        out: list[list[int]] = []
        with _tokenizer_threads(workers > 1 and len(texts) >= PARALLEL_MIN_TEXTS):
            for start in range(0, len(texts), chunk):
                out += _encode_chunk((tokenizer, texts[start:start + chunk]))
        return out
    if workers > 1 and len(texts) >= PARALLEL_MIN_TEXTS:
        from concurrent.futures import ProcessPoolExecutor

        size = -(-len(texts) // (workers * 4))
        pieces = [(tokenizer, texts[i:i + size]) for i in range(0, len(texts), size)]
        with ProcessPoolExecutor(workers) as pool:
            return [ids for part in pool.map(_encode_chunk, pieces) for ids in part]
    return _encode_chunk((tokenizer, texts))


CHAT_ATTR = "chat_template"
"""The frame attribute (and report.json key) saying validation rendered the rows with the chat template."""


def chat_rendered(frame) -> bool:
    """Whether a validated frame's texts were rendered by the chat template (set when the data are read)."""
    return bool(getattr(frame, "attrs", {}).get(CHAT_ATTR, False))


def _probe(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    with_special = tokenizer(_PROBE)["input_ids"]
    bare = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start:start + len(bare)] == bare:
            return tuple(with_special[:start]), tuple(with_special[start + len(bare):])
    return (), ()


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by default (its BOS, where it adds one; often nothing)."""
    return list(_probe(tokenizer)[0])


def added_tokens(tokenizer, chat: bool) -> tuple[int, str | None]:
    """What the rules add around prompt + response: (ids before it, the EOS text appended after it or None).

    For counting lengths without building the sequences (validation)."""
    if chat:
        return 0, None
    return len(special_prefix(tokenizer)), eos_text(tokenizer) or None


def eos_text(tokenizer) -> str:
    return getattr(tokenizer, "eos_token", None) or ""


def prompt_ids(tokenizer, prompts: list[str], chat: bool, workers: int | None = None) -> list[list[int]]:
    """The ids a model is given to answer each prompt (for generation)."""
    prefix = [] if chat else special_prefix(tokenizer)
    return [prefix + ids for ids in encode(tokenizer, prompts, workers)]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokenize_groups(tokenizer, prompts: list[str], responses: list[list[str]], chat: bool,
                    workers: int | None = None) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(prompt_ids, completion_ids) of each prompt with its K responses, by the rules in the module doc.

    The completion starts where the prompt's ids and every prompt + response's ids
    first differ (the minimum over the group's responses, as TRL's DPO does).
    """
    prefix = [] if chat else special_prefix(tokenizer)
    eos = eos_text(tokenizer)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    unique_prompts = list(dict.fromkeys(prompts))
    fulls = [prompt + r for prompt, group in zip(prompts, responses, strict=True) for r in group]
    ends = [] if chat else [bool(eos) and r.endswith(eos) for group in responses for r in group]
    encoded = encode(tokenizer, unique_prompts + fulls, workers)
    prompt_tokens = {p: prefix + ids for p, ids in zip(unique_prompts, encoded[:len(unique_prompts)], strict=True)}
    full_tokens = iter(encoded[len(unique_prompts):])
    flags = iter(ends)
    out_prompts, out_completions = [], []
    for prompt, group in zip(prompts, responses, strict=True):
        ids = prompt_tokens[prompt]
        full = []
        for _ in group:
            seq = prefix + next(full_tokens)
            if not chat and not next(flags) and eos_id is not None:
                seq.append(eos_id)
            full.append(seq)
        start = min(common_prefix(ids, f) for f in full)
        out_prompts.append(ids[:start])
        out_completions.append([f[start:] for f in full])
    return out_prompts, out_completions


def end_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the generation config's (several for Llama-3, Phi-3, Gemma, Qwen), and EOS."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None) if config is not None else None
    for source in (value, getattr(tokenizer, "eos_token_id", None)):
        for i in (source if isinstance(source, (list, tuple)) else [source]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def pad_id(tokenizer) -> int:
    """The id padding is filled with: masked out everywhere, so any id does (GPT-2 has no pad token)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0
