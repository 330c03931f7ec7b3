"""The reference pass: the SFT model's summed log-probability of every response, written to the reference file.

Sequences are scored padding-free (`lexalign.models.packing`: packed into rows of at
most a token budget, attention kept within each sequence) with the lean
log-prob head (`lexalign.models.logprobs`), which never holds the [tokens x vocabulary]
logits; each sequence is truncated as the trainers' collator truncates it.

In several processes (`scale.reference`) each scores its share of the packed
batches and the main process writes the file from all of them
(`lexalign.core.shares`): the same file, value for value, as one process writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lexalign.core.errors import LexAlignError
from lexalign.core.paths import adapter_base, lone_adapter, require_model
from lexalign.core.shares import Share, piece
from lexalign.reference.cache import cached_tokens
from lexalign.reference.keys import METADATA_KEY, compute_dtype, read_key, reference_key, tokenizer_hash
from lexalign.reference.layout import TRUNCATION_MODE, responses, split_groups

if TYPE_CHECKING:
    import pandas as pd


def group_logps(model, tokens, max_length: int | None, truncation_mode: str = TRUNCATION_MODE, device: str = "cpu",
                autocast_dtype=None, token_budget: int | None = None) -> list[list[float]]:
    """Summed log-prob of each response under `model` (with the lean head), [groups][K]: `scored_piece` in one
    process."""
    n = tokens.num_rows
    if not n:
        return []
    k = len(tokens.column("completion_ids")[0])
    share = Share()
    part = scored_piece(model, tokens, max_length, truncation_mode, device, autocast_dtype, token_budget, share)
    return _by_group(share.gather({"logps": part}, {"logps": n * k})["logps"], n, k)


def _by_group(flat: list[float], n: int, k: int) -> list[list[float]]:
    return [flat[i * k:(i + 1) * k] for i in range(n)]


def reference_sequences(tokens, max_length: int | None, truncation_mode: str = TRUNCATION_MODE
                        ) -> tuple[list[list[int]], list[int]]:
    """Every prompt + response of a token table (group-major), truncated as the trainers' collator truncates it
    (keep_start to `max_length`), and where each response starts."""
    sequences, starts = [], []
    for prompt, group in zip(tokens.column("prompt_ids").to_pylist(), tokens.column("completion_ids").to_pylist(),
                             strict=True):
        for completion in group:
            full, start = prompt + completion, len(prompt)
            if max_length and len(full) > max_length:  # as the collator truncates
                drop = len(full) - max_length
                full, start = (full[:max_length], start) if truncation_mode == "keep_start" else \
                    (full[drop:], max(start - drop, 0))
            sequences.append(full)
            starts.append(start)
    return sequences, starts


def scored_piece(model, tokens, max_length: int | None, truncation_mode: str, device: str, autocast_dtype,
                 token_budget: int | None, share: Share) -> dict:
    """This process's share of the summed log-probs of a token table's responses (`lexalign.core.shares`: rows are
    group * K + response), in packed batches of at most `token_budget` tokens: every architecture LexAlign has run
    takes packed input (`lexalign.models.packing.PACKED_UNSUPPORTED` is empty), so there is no padded path to fall
    back to."""
    import torch

    from lexalign.models import packing

    if not packing.supports_packing(model):
        raise LexAlignError(f"The reference step cannot score a {model.config.model_type} model: its attention "
                            "ignores packed position_ids", hint="Align without the reference step (lexalign align)")
    sequences, starts = reference_sequences(tokens, max_length, truncation_mode)
    mine = share.take(packing.plan_batches(model, [len(s) for s in sequences], device, token_budget))
    autocast = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype is not None \
        else contextlib.nullcontext()
    with autocast:
        flat = packing.sequence_logps(model, sequences, starts, device, token_budget, batches=mine)
    return piece(mine, flat)


def load_reference_model(model_path: Path, device: str, load_in_4bit: bool, trust_remote_code: bool,
                         stack: contextlib.ExitStack, bf16: bool | str | None = None):
    """The reference model as align's policy starts: the SFT weights (an adapter alone merged into its base)."""
    from trl.trainer.utils import disable_dropout_in_model

    from lexalign.models import loading as models
    from lexalign.models.logprobs import add_lean_lm_head

    path = require_model(model_path, "lexalign finetune --config config/finetune.yaml")
    if lone_adapter(path):
        base = adapter_base(path)
        merged = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lexalign-reference-")))
        models.merged_model(path, Path(base), trust_remote_code).save_pretrained(merged, safe_serialization=True)
        path = merged
    model = models.load_causal_lm(path, device, quantize_4bit=load_in_4bit, trust_remote_code=trust_remote_code,
                                  bf16=bf16)
    if not load_in_4bit:
        model.to(device)
    model.eval()
    disable_dropout_in_model(model)
    add_lean_lm_head(model)
    return model


def compute_reference(model_path: str | Path, train: pd.DataFrame, evals: pd.DataFrame, output: str | Path,
                      layout: str = "pairs", max_length: int | None = 512, truncation_mode: str = TRUNCATION_MODE,
                      device: str = "cpu", load_in_4bit: bool = False, trust_remote_code: bool = False,
                      tokenizer_path: str | Path | None = None, cache_dir: str | Path | None = None,
                      workers: int | None = None, token_tables: dict | None = None,
                      share: Share | None = None, bf16: bool | str | None = None) -> dict | None:
    """Compute the reference log-probs of every train and eval group into `output` (parquet); return a summary.

    `share` (a launched step, `lexalign.core.shares`): this process scores its share of the batches, and the main
    process gathers them into the file one process writes and returns the summary (the others None)."""
    import torch

    share = share or Share(output=Path(output))
    model_path = Path(model_path)
    tokenizer_path = Path(tokenizer_path or model_path)
    k = responses(layout)  # validates the layout, before any work
    splits = {"train": split_groups(train, layout), "eval": split_groups(evals, layout)}
    dtype = compute_dtype(device, load_in_4bit, bf16)  # the policy's (the alignment's `bf16`)
    # The key hashes the weights: only the main process, which writes the file, needs it.
    key = reference_key(model_path, tokenizer_path, splits, layout, max_length, truncation_mode, load_in_4bit,
                        dtype) if share.main else None
    started = time.perf_counter()
    # The main process fills the token cache, then the others read it rather than all tokenizing at once.
    with share.main_first() if cache_dir else contextlib.nullcontext():
        tokens, cache_hits = token_tables_of(splits, tokenizer_path, trust_remote_code, cache_dir, workers,
                                             token_tables)
    tokenized = time.perf_counter() - started
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    with contextlib.ExitStack() as stack:
        model = load_reference_model(model_path, device, load_in_4bit, trust_remote_code, stack, bf16)
        started = time.perf_counter()
        pieces = {name: scored_piece(model, tokens[name], max_length, truncation_mode, device, autocast, None, share)
                  for name in splits}
        computed = time.perf_counter() - started
        del model
    flat = share.gather(pieces, {name: len(groups) * k for name, groups in splits.items()})
    if flat is None:
        return None  # another process's share: the main process writes the file
    logps = {name: _by_group(flat[name], len(groups), k) for name, groups in splits.items()}
    write_reference(output, splits, tokens, logps, key)
    return {"train_groups": len(splits["train"]), "eval_groups": len(splits["eval"]),
            "sequences": sum(len(g) for g in splits.values()) * k, "layout": layout,
            "tokenize_seconds": round(tokenized, 3), "token_cache": cache_hits, "forward_seconds": round(computed, 3),
            "processes": share.world, "key": key["key"], "output": str(output)}


def token_tables_of(splits: dict, tokenizer_path: Path, trust_remote_code: bool, cache_dir, workers,
                    token_tables: dict | None) -> tuple[dict, list[str]]:
    """Each split's token table (`token_tables` as given: sampled ids, whose text re-encoded could give other
    tokens; else tokenized, or read from the cache), and the splits the cache answered."""
    if token_tables is not None:
        return {name: token_tables[name] for name in splits}, []
    from lexalign.models import loading as models

    tokenizer = models.load_tokenizer(tokenizer_path, trust_remote_code)
    tokenizer_key = tokenizer_hash(tokenizer_path)
    tokens, hits = {}, []
    for name, groups in splits.items():
        tokens[name], hit = cached_tokens(tokenizer, tokenizer_key, groups, cache_dir, workers)
        if hit:
            hits.append(name)
    return tokens, hits


def write_reference(output: str | Path, splits: dict, tokens: dict, logps: dict, key: dict) -> None:
    """The reference file: one row per group of each split, its key in the metadata; written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = []
    for name, groups in splits.items():
        parts.append(pa.table({
            "split": pa.array([name] * len(groups), type=pa.string()),
            "row": pa.array(groups.rows, type=pa.int64()),
            "prompt_ids": tokens[name].column("prompt_ids"),
            "completion_ids": tokens[name].column("completion_ids"),
            "scores": pa.array(groups.scores, type=pa.list_(pa.float64())),
            "ref_logps": pa.array(logps[name], type=pa.list_(pa.float64())),
        }))
    table = pa.concat_tables(parts)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(key, sort_keys=True).encode()})
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, output)


def load_reference(path: str | Path) -> dict:
    """The reference file's rows per split (pyarrow tables), in the order of the groups."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return {name: table.filter(pc.equal(table.column("split"), name)) for name in ("train", "eval")}


def is_current(path: str | Path, model_path: str | Path, tokenizer_path: str | Path, train: pd.DataFrame,
               evals: pd.DataFrame, setting: dict, device: str) -> bool:
    """Whether the reference file at `path` was computed for exactly these inputs (so it can be reused)."""
    path = Path(path)
    if not path.is_file():
        return False
    layout = setting["layout"]
    splits = {"train": split_groups(train, layout), "eval": split_groups(evals, layout)}
    expected = reference_key(model_path, tokenizer_path, splits, layout, setting["max_length"],
                             setting["truncation_mode"], setting["load_in_4bit"],
                             compute_dtype(device, setting["load_in_4bit"], setting.get("bf16")))
    try:
        return read_key(path).get("key") == expected["key"]
    except LexAlignError:
        return False
