"""Sample K completions per prompt from a model folder, in resumable shards.

(About 400 lines on purpose: planning the prompts, the two samplers, the shard files and their join are one
resumable job, read in one place.)

The completions are the ids the model sampled, kept as ids: a completion ends
with the end id the model stopped on (every end id of generation_config, as the
evaluate step stops: `lexalign.core.tokens.end_ids`), or is marked `truncated` when
`max_new_tokens` cut it. Its text (decoded without the end id) is for judges and
people; the ids are what training reads (`lexalign.train.trainer_data.sampled_token_table`),
so no decode/re-encode drift reaches the trainer.

Prompts are rendered by the model's own chat template (a string becomes one user
turn, a list of messages is rendered as is, an already rendered text is taken
as is) and turned into ids by `lexalign.core.tokens`, the one place text becomes ids:
they equal `apply_chat_template(..., add_generation_prompt=True, tokenize=True)`.
A model without a template gets plain text with the tokenizer's own prefix.
A prompt longer than the budget (`max_prompt_tokens`; by default the model's
context minus `max_new_tokens`) is skipped and counted, never cut.

Prompts are sorted by length, longest first (an out-of-memory shows at the
start), and sampled `batch_size` at a time, left padded, by LexAlign's sampler
(`lexalign.generation.fast_sampling`: the prompt computed once for its K answers,
finished answers out of the batch, a preallocated cache; transformers' generate
where the model's cache is not one it handles), from the model as loaded
(`Sampling.dtype` opts into casting it, say to bfloat16, for speed: another distribution).
With `engine="vllm"` (the `vllm` extra, a CUDA GPU) vLLM samples each batch
instead, from the same prompt ids, with the same knobs and end ids and its own
per-request seed; what it returns is kept as ids the same way.
Each `shard_prompts` prompts are written to `shards/` atomically under a key
(policy hash, sampling, batch size, the prompts' ids): a killed job rerun
regenerates only the shards it had not finished. Each batch draws from its own
seed (the run's seed, its shard, its batch), so the output is the same whether
a shard ran in the first attempt or the second, or in which of several
processes (`process=(index, count)`: shard n is process n % count's).

Output, in `out_dir`: `generations.parquet`, one row per kept prompt in input
order (`row`, `prompt` (rendered), `question` (as given, for judges), `prompt_ids`, `completion_ids` (K),
`completions` (K),
`truncated` (K), the sampling settings, `policy`, `policy_hash`), and
`report.json` (counts; generation tokens/s, summed over the shards' own timings).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from lexalign.core import io, tokens
from lexalign.core.errors import LexAlignError
from lexalign.models.loading import native_bf16

FORMAT = 2
"""Bumped when the output's layout or the sampling procedure changes (part of the key). 2: LexAlign's sampler
(other draws than generate's, from the same distribution)."""
METADATA_KEY = b"lexalign.generations"
TIMING_KEY = b"lexalign.timing"
"""A shard's generation seconds and tokens: the report sums them over every shard, whichever attempt or
process made it."""
SHARD_PROMPTS = 256
ENGINES = ("hf", "vllm")
"""hf: LexAlign's sampler on transformers' forward (the default, every device; generate() where it must);
vllm: vLLM on a CUDA GPU (the `vllm` extra)."""
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Sampling:
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    dtype: str | None = None
    """None: sample from the model as loaded. An opt-in dtype the policy is cast to for sampling (bfloat16: about
    twice the speed on a CPU with avx512_bf16), which samples from a slightly different distribution than the
    policy's own (part of the key, like every knob). `auto`: bfloat16 where the device computes it natively (a CUDA
    GPU with bf16, a CPU with avx512_bf16 or AMX), the model as loaded elsewhere (bf16 emulated on an older CPU
    is slower than float32); the key holds what it resolved to (`resolved`)."""

    def resolved(self, device: str) -> Sampling:
        """This sampling with `auto` replaced by what it means on `device` (None: as loaded)."""
        if self.dtype != "auto":
            return self
        return replace(self, dtype="bfloat16" if native_bf16(device) else None)

    def check(self) -> None:
        problems = []
        if self.samples_per_prompt < 1:
            problems.append(f"samples_per_prompt is {self.samples_per_prompt} (at least 1)")
        if self.temperature <= 0:
            problems.append(f"temperature is {self.temperature} (above 0: K greedy samples would be identical)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p is {self.top_p} (in (0, 1])")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens is {self.max_new_tokens} (at least 1)")
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"dtype is {self.dtype} (null, or one of {', '.join(DTYPES)})")
        if problems:
            raise LexAlignError("Invalid sampling settings", *problems,
                                hint="Fix the online sampling settings in the config")

    def generate_kwargs(self) -> dict:
        """Every knob that shapes the distribution, set explicitly: generate() otherwise fills unset ones from
        the checkpoint's generation_config (Qwen's top_k 20 and repetition_penalty 1.05, Llama's top_p 0.9),
        and the samples would not be from the settings recorded beside them."""
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0,
                "repetition_penalty": 1.0, "max_new_tokens": self.max_new_tokens,
                "num_return_sequences": self.samples_per_prompt, "use_cache": True}


# --- prompts -----------------------------------------------------------------------------------------


def render_prompts(tokenizer, prompts: list, rendered: bool = False) -> tuple[list[str], bool]:
    """(the prompt texts, whether they are chat-rendered). Strings become one user turn of the chat template
    (or stay plain text on a model without one); lists of messages are rendered; `rendered` texts (validated
    chat data) are taken as they are."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if rendered:
        return [str(p) for p in prompts], True
    if not has_template:
        if any(not isinstance(p, str) for p in prompts):
            raise LexAlignError("Prompts given as messages need a chat template, and the tokenizer has none",
                                hint="Give the prompts as plain strings, or use a model with a chat_template")
        return list(prompts), False
    out = []
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - a template may raise anything (jinja's raise_exception)
            raise LexAlignError(f"The chat template could not render prompt {i}",
                                f"{type(err).__name__}: {str(err)[:200]}",
                                hint="Check the prompt's messages (roles the template accepts)") from None
        out.append(text)
    return out, True


def question(prompt) -> str:
    """The prompt as a judge reads it: the string as given, or a conversation's turns as "role: content"."""
    if isinstance(prompt, str):
        return prompt
    turns = list(prompt)
    if len(turns) == 1:
        return str(turns[0].get("content", ""))
    return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in turns)


def longest_prompt(model_dir: Path, sampling: Sampling, max_prompt_tokens: int | None) -> int | None:
    """The longest prompt kept: `max_prompt_tokens`, else the model's context minus max_new_tokens."""
    from transformers import AutoConfig

    if max_prompt_tokens:
        return max_prompt_tokens
    config = AutoConfig.from_pretrained(model_dir)
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    return max(int(context) - sampling.max_new_tokens, 0) if context else None


@dataclass
class Plan:
    rows: list[int]
    """The input position of each kept prompt, in generation order (longest first)."""
    ids: dict[int, list[int]]
    texts: dict[int, str]
    too_long: list[int]
    empty: list[int]


def plan(texts: list[str], ids: list[list[int]], budget: int | None) -> Plan:
    too_long = [i for i, seq in enumerate(ids) if budget is not None and len(seq) > budget]
    empty = [i for i, seq in enumerate(ids) if not seq]
    skip = set(too_long) | set(empty)
    kept = sorted((i for i in range(len(ids)) if i not in skip), key=lambda i: (-len(ids[i]), i))
    return Plan(kept, {i: ids[i] for i in kept}, {i: texts[i] for i in kept}, too_long, empty)


# --- sampling ----------------------------------------------------------------------------------------


def left_pad(batch: list[list[int]], pad: int):
    """input_ids and attention_mask with every prompt right-aligned: generation continues from the last column."""
    import torch

    width = max(len(seq) for seq in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, seq in enumerate(batch):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention[row, width - len(seq):] = 1
    return input_ids, attention


def cut_at_end(generated: list[int], stops: list[int]) -> tuple[list[int], bool]:
    """(the completion through its first end id, truncated): without an end id, max_new_tokens cut it."""
    for i, token in enumerate(generated):
        if token in stops:
            return generated[: i + 1], False
    return generated, True


def batch_seed(seed: int, shard: int, batch: int) -> int:
    digest = hashlib.sha256(f"{seed}:{shard}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def sample(model, tokenizer, batch: list[list[int]], sampling: Sampling, seed: int,
           fast: bool = True) -> list[list[tuple]]:
    """K (completion ids, truncated) for each prompt of the batch (see `sample_batches`)."""
    return sample_batches(model, tokenizer, [batch], sampling, [seed], fast=fast)[0]


def sample_batches(model, tokenizer, batches: list[list[list[int]]], sampling: Sampling, seeds: list[int],
                   fast: bool = True, on_prompt: Callable[[int], None] | None = None) -> list[list[list[tuple]]]:
    """K (completion ids, truncated) for each prompt of each batch, batch b drawing from seeds[b]. LexAlign's sampler
    runs them as one queue in the rows of the largest batch (prompts join as answers end: the same samples as batch
    by batch, up to float noise); transformers' generate, batch by batch, where the model's cache is not one it
    handles (or with `fast` off). `on_prompt(n)`: n more prompts are done."""
    import torch

    from lexalign.core.tokens import pad_id
    from lexalign.generation import fast_sampling

    stops = tokens.end_ids(model, tokenizer)
    if fast:
        samples = fast_sampling.sample(model, batches, seeds, stops, sampling.samples_per_prompt,
                                       sampling.temperature, sampling.top_p, sampling.max_new_tokens,
                                       on_prompt=on_prompt)
        if samples is not None:
            return samples
    device, k, out = next(model.parameters()).device, sampling.samples_per_prompt, []
    for batch, seed in zip(batches, seeds, strict=True):
        input_ids, attention = left_pad(batch, pad_id(tokenizer))
        torch.manual_seed(seed)  # seeds every device's generator too
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                       eos_token_id=stops, pad_token_id=pad_id(tokenizer),
                                       **sampling.generate_kwargs())
        rows = generated[:, input_ids.shape[1]:].tolist()  # prompt i's K rows are i*K .. i*K+K-1
        out.append([[cut_at_end(rows[i * k + j], stops) for j in range(k)] for i in range(len(batch))])
        if on_prompt is not None:
            on_prompt(len(batch))
    return out


def check_vllm(device: str) -> None:
    """The vllm engine can run here: vLLM installed, a CUDA device, one process (before any work)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise LexAlignError("online.sampling.engine is vllm, but vLLM is not installed",
                            hint='pip install "lexalign[vllm]" on a machine with a CUDA GPU, or set '
                                 "online.sampling.engine: hf")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each launched process would take the first GPU
        raise LexAlignError("online.sampling.engine vllm samples in one process (it batches over the whole GPU "
                            "itself), and scale.generate launched several",
                            hint="Set scale.generate.processes_per_node: 1, or online.sampling.engine: hf")
    if not str(device).startswith("cuda"):
        raise LexAlignError(f'online.sampling.engine is vllm, which needs a CUDA GPU, and the device is "{device}"',
                            hint="Set online.sampling.engine: hf (transformers' generate runs everywhere)")


def vllm_sampler(model_dir: Path, tokenizer, sampling: Sampling, device: str,
                 trust_remote_code: bool = False) -> Callable[..., list[list[list[tuple]]]]:
    """vLLM's sampling of batches, as `sample_batches` returns it: K (completion ids, truncated) per prompt. The prompt
    ids go in as ids (no second tokenization), the knobs are sample's (top_k off, no repetition penalty: never
    the checkpoint's generation_config), the end ids are the same, and each batch draws from its own seed.
    vLLM keeps a stop id in the completion's ids, so `cut_at_end` reads them as it reads transformers'."""
    check_vllm(device)
    from transformers import GenerationConfig
    from vllm import LLM, SamplingParams

    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        generation = None
    stops = tokens.end_ids(type("Checkpoint", (), {"generation_config": generation})(), tokenizer)
    llm = LLM(model=str(model_dir), tokenizer=str(model_dir), trust_remote_code=trust_remote_code,
              generation_config="vllm", seed=sampling.seed)

    def run(batches: list[list[list[int]]], seeds: list[int], on_prompt=None) -> list[list[list[tuple]]]:
        out = []
        for batch, seed in zip(batches, seeds, strict=True):
            params = SamplingParams(n=sampling.samples_per_prompt, temperature=sampling.temperature,
                                    top_p=sampling.top_p, top_k=-1, repetition_penalty=1.0,
                                    max_tokens=sampling.max_new_tokens, stop_token_ids=stops, seed=seed,
                                    detokenize=False)
            outputs = llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False)
            out.append([[cut_at_end(list(c.token_ids), stops) for c in sorted(o.outputs, key=lambda c: c.index)]
                        for o in outputs])
            if on_prompt is not None:
                on_prompt(len(batch))
        return out

    return run


# --- shards ------------------------------------------------------------------------------------------


def _write_parquet(table, path: Path) -> None:
    """Through a temporary name and one rename: a killed job never leaves a shard that looks finished."""
    import pyarrow.parquet as pq

    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _stored_key(path: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - an unreadable file is simply not a finished shard
        return None
    return json.loads(meta[METADATA_KEY]).get("key") if METADATA_KEY in meta else None


def _table(records: list[dict], meta: dict, timing: dict):
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    schema = pa.schema([("row", pa.int64()), ("prompt", pa.string()), ("question", pa.string()), ("prompt_ids", ids),
                        ("completion_ids", pa.list_(ids)), ("completions", pa.list_(pa.string())),
                        ("truncated", pa.list_(pa.bool_())), ("policy", pa.string()), ("policy_hash", pa.string()),
                        ("samples_per_prompt", pa.int32()), ("temperature", pa.float64()), ("top_p", pa.float64()),
                        ("max_new_tokens", pa.int32()), ("seed", pa.int64())],
                       metadata={METADATA_KEY: json.dumps(meta, sort_keys=True).encode(),
                                 TIMING_KEY: json.dumps(timing).encode()})
    return pa.Table.from_pylist(records, schema=schema)


def generate(model_dir: str | Path, prompts: list, out_dir: str | Path, sampling: Sampling, batch_size: int = 8,
             device: str = "cpu", rendered: bool = False, max_prompt_tokens: int | None = None,
             shard_prompts: int = SHARD_PROMPTS, on_shard: Callable[[int], None] | None = None,
             process: tuple[int, int] = (0, 1), engine: str = "hf") -> dict:
    """Sample `sampling.samples_per_prompt` completions for each prompt into `out_dir` (see the module doc);
    returns the report. `on_shard(i)` is called after shard i is written (tests stop a run there).

    `process` (index, count): one of several processes (one per GPU) sharing the job: it generates the shards
    whose number % count == index and returns without joining them; once every process is done, one call with
    the default (0, 1) joins them (it finds every shard finished, so it loads no model; any shard a failed
    process left unfinished, it makes)."""
    import torch

    from lexalign.core.paths import require_model
    from lexalign.models.loading import load_causal_lm, load_tokenizer

    sampling.check()
    if engine == "hf":
        sampling = sampling.resolved(device)
    prompts = list(prompts)  # a pandas column indexes by label, not position
    index, count = process
    if engine not in ENGINES:
        raise LexAlignError(f'Unknown generation engine "{engine}"', f"Known: {', '.join(ENGINES)}",
                            hint="Set online.sampling.engine to hf or vllm")
    if engine == "vllm":
        check_vllm(device)
        if sampling.dtype not in (None, "auto"):
            raise LexAlignError("online.sampling.dtype is for the hf engine (vLLM picks its own)",
                                hint="Remove online.sampling.dtype, or set online.sampling.engine: hf")
    if batch_size < 1 or shard_prompts < 1 or not 0 <= index < count:
        raise LexAlignError(f"batch_size ({batch_size}) and shard_prompts ({shard_prompts}) must be at least 1, "
                            f"and the process index ({index}) below the process count ({count})")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    require_model(model_dir, "the previous round (or the SFT step)")
    tokenizer = load_tokenizer(model_dir)
    texts, chat = render_prompts(tokenizer, prompts, rendered)
    ids = tokens.prompt_ids(tokenizer, texts, chat)
    budget = longest_prompt(model_dir, sampling, max_prompt_tokens)
    work = plan(texts, ids, budget)
    questions = {i: question(prompts[i]) for i in work.rows}
    if not work.rows:
        raise LexAlignError(f"No prompt to sample from: {len(work.too_long)} of {len(prompts)} are longer than the "
                            f"budget and {len(work.empty)} are empty",
                            hint="Raise max_prompt_tokens (or lower max_new_tokens), or give shorter prompts")
    meta = {"format": FORMAT, "policy_hash": io.hash_path(model_dir), "sampling": asdict(sampling),
            "batch_size": batch_size, "shard_prompts": shard_prompts, "chat": chat,
            "prompts": hashlib.sha256(json.dumps([work.ids[i] for i in work.rows]).encode()).hexdigest()}
    if engine != "hf":  # another sampler draws other samples (the hf key stays what it was)
        meta["engine"] = engine
    meta["key"] = io.hash_object(meta)  # what the samples depend on: the weights' hash, not the folder's name
    meta["policy"] = str(model_dir)
    final, shard_dir = out_dir / "generations.parquet", out_dir / "shards"
    counts = {"prompts": len(prompts), "kept": len(work.rows), "skipped_too_long": len(work.too_long),
              "skipped_empty": len(work.empty), "skipped_rows": sorted(work.too_long + work.empty),
              "prompt_budget": budget}
    if final.exists() and _stored_key(final) == meta["key"]:  # finished before: the model is not even loaded
        return {**io.read_json(out_dir / "report.json"), "shards_generated": 0, "resumed": "complete"}
    shard_dir.mkdir(parents=True, exist_ok=True)
    sampler, rng_state, generated = None, torch.random.get_rng_state(), 0
    shards = [work.rows[s:s + shard_prompts] for s in range(0, len(work.rows), shard_prompts)]
    # Progress over this process's prompts (a resumed job starts the bar at the finished shards').
    progress = tqdm(total=sum(len(rows) for number, rows in enumerate(shards) if number % count == index),
                    desc=f"Sampling {sampling.samples_per_prompt} answers a prompt", unit="prompt", file=sys.stderr,
                    mininterval=5)
    try:
        for number, rows in enumerate(shards):
            path = shard_dir / f"shard-{number:05d}.parquet"
            if number % count != index:
                continue  # another process's
            io.remove_stale_temporaries(path)
            if path.exists() and _stored_key(path) == meta["key"]:
                progress.update(len(rows))
                continue  # finished by an earlier attempt
            if sampler is None:  # only when some shard is missing: a join or a finished resume loads nothing
                if engine == "vllm":
                    sampler = vllm_sampler(model_dir, tokenizer, sampling, device)
                else:
                    model = load_causal_lm(model_dir, device).to(device).eval()
                    if sampling.dtype is not None:  # the opt-in: another distribution, faster
                        model = model.to(getattr(torch, sampling.dtype))
                    sampler = functools.partial(sample_batches, model, tokenizer, sampling=sampling)
            started, records = time.perf_counter(), []
            parts = [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]
            samples = sampler([[work.ids[i] for i in part] for part in parts],
                              seeds=[batch_seed(sampling.seed, number, b) for b in range(len(parts))],
                              on_prompt=progress.update)
            for part, groups in zip(parts, samples, strict=True):
                records += [{**_record(i, work, group, tokenizer, meta), "question": questions[i]}
                            for i, group in zip(part, groups, strict=True)]
            timing = {"seconds": time.perf_counter() - started,
                      "tokens": sum(len(c) for r in records for c in r["completion_ids"])}
            _write_parquet(_table(records, meta, timing), path)
            generated += 1
            if on_shard is not None:
                on_shard(number)
    finally:
        progress.close()
        torch.random.set_rng_state(rng_state)
    if count > 1:
        return {**counts, "shards": len(shards), "shards_generated": generated, "joined": False}
    return _finish(shard_dir, len(shards), final, meta, counts, generated)


def _record(row: int, work: Plan, group: list[tuple], tokenizer, meta: dict) -> dict:
    completions = [ids[:-1] if not truncated else ids for ids, truncated in group]  # the text without the end id
    return {"row": row, "prompt": work.texts[row], "prompt_ids": work.ids[row],
            "completion_ids": [ids for ids, _ in group],
            "completions": tokenizer.batch_decode(completions, skip_special_tokens=True),
            "truncated": [t for _, t in group], "policy": meta["policy"], "policy_hash": meta["policy_hash"],
            **meta["sampling"]}


def _finish(shard_dir: Path, n_shards: int, final: Path, meta: dict, counts: dict, generated: int) -> dict:
    """Join the shards in input order into generations.parquet; report.json first, so a finished parquet always
    has its report."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pieces = [pq.read_table(shard_dir / f"shard-{n:05d}.parquet") for n in range(n_shards)]
    timings = [json.loads(piece.schema.metadata[TIMING_KEY]) for piece in pieces]
    seconds, new_tokens = sum(t["seconds"] for t in timings), sum(t["tokens"] for t in timings)
    table = pa.concat_tables(pieces).sort_by("row")
    table = table.replace_schema_metadata({METADATA_KEY: pieces[0].schema.metadata[METADATA_KEY]})
    truncated = [t for group in table.column("truncated").to_pylist() for t in group]
    lengths = [len(c) for group in table.column("completion_ids").to_pylist() for c in group]
    report = {**counts, "completions": len(truncated), "truncated": sum(truncated),
              "finished": len(truncated) - sum(truncated), "mean_completion_tokens": sum(lengths) / len(lengths),
              "shards": n_shards, "shards_generated": generated, "key": meta["key"], "policy": meta["policy"],
              "policy_hash": meta["policy_hash"], "sampling": meta["sampling"], "chat": meta["chat"],
              "seconds": seconds, "tokens_per_second": new_tokens / seconds if seconds else None}
    io.write_json(final.parent / "report.json", report)
    _write_parquet(table, final)
    shutil.rmtree(shard_dir, ignore_errors=True)
    return report


def read_generations(out_dir: str | Path):
    """The generations table of a finished run."""
    import pyarrow.parquet as pq

    path = Path(out_dir) / "generations.parquet"
    if not path.exists():
        raise LexAlignError(f'No generations at "{path}"', hint="Run the round's generate job first")
    return pq.read_table(path)
