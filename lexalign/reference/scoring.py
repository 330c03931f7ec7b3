"""The reference pass: the SFT model's summed log-probability of every response, written to the reference file.

Sequences are scored padding-free (`lexalign.packing`: packed into rows of at
most a token budget, attention kept within each sequence) with the lean
log-prob head (`lexalign.logprobs`), which never holds the [tokens x vocabulary]
logits; each sequence is truncated as the trainers' collator truncates it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lexalign.errors import LexAlignError
from lexalign.paths import adapter_base, lone_adapter
from lexalign.reference.cache import cached_tokens
from lexalign.reference.keys import METADATA_KEY, compute_dtype, read_key, reference_key
from lexalign.reference.layout import TRUNCATION_MODE, group_size, split_groups

if TYPE_CHECKING:
    import pandas as pd


def group_logps(model, tokens, max_length: int | None, truncation_mode: str = TRUNCATION_MODE, device: str = "cpu",
                autocast_dtype=None, token_budget: int | None = None) -> list[list[float]]:
    """Summed log-prob of each response under `model` (with the lean head), [groups][K].

    `tokens`: a token table (`lexalign.reference.cache`). Each prompt + response is truncated as the trainers'
    collator truncates it (keep_start to `max_length`) and scored on its response tokens, in packed batches of
    at most `token_budget` tokens: every architecture LexAlign has run takes packed input
    (`lexalign.packing.PACKED_UNSUPPORTED` is empty), so there is no padded path to fall back to.
    """
    import numpy as np
    import torch

    from lexalign import packing

    n = tokens.num_rows
    if not n:
        return []
    if not packing.supports_packing(model):
        raise LexAlignError(f"The reference step cannot score a {model.config.model_type} model: its attention "
                            "ignores packed position_ids", hint="Align without the reference step (lexalign align)")
    prompts = tokens.column("prompt_ids").to_pylist()
    completions = tokens.column("completion_ids").to_pylist()
    k = len(completions[0])
    autocast = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype is not None \
        else contextlib.nullcontext()
    sequences, starts = [], []
    for prompt, group in zip(prompts, completions, strict=True):
        for completion in group:
            full, start = prompt + completion, len(prompt)
            if max_length and len(full) > max_length:  # as the collator truncates
                drop = len(full) - max_length
                full, start = (full[:max_length], start) if truncation_mode == "keep_start" else \
                    (full[drop:], max(start - drop, 0))
            sequences.append(full)
            starts.append(start)
    with autocast:
        flat = packing.sequence_logps(model, sequences, starts, device, token_budget)
    return np.asarray(flat).reshape(n, k).tolist()


def load_reference_model(model_path: Path, device: str, load_in_4bit: bool, trust_remote_code: bool,
                         stack: contextlib.ExitStack):
    """The reference model as align's policy starts: the SFT weights (an adapter alone merged into its base)."""
    from trl.trainer.utils import disable_dropout_in_model

    from lexalign import models
    from lexalign.logprobs import add_lean_lm_head

    path = models.require_model(model_path, "lexalign finetune --config config/finetune.yaml")
    if lone_adapter(path):
        base = adapter_base(path)
        merged = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lexalign-reference-")))
        models.merged_model(path, Path(base), trust_remote_code).save_pretrained(merged, safe_serialization=True)
        path = merged
    model = models.load_causal_lm(path, device, quantize_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
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
                      workers: int | None = None,
                      token_tables: dict | None = None) -> dict:
    """Compute the reference log-probs of every train and eval group into `output` (parquet); return a summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from lexalign import models

    model_path = Path(model_path)
    tokenizer_path = Path(tokenizer_path or model_path)
    group_size(layout)  # validates the layout, before any work
    splits = {"train": split_groups(train, layout), "eval": split_groups(evals, layout)}
    key = reference_key(model_path, tokenizer_path, splits, layout, max_length, truncation_mode, load_in_4bit,
                        compute_dtype(device, load_in_4bit))
    tokenizer = models.load_tokenizer(tokenizer_path, trust_remote_code)
    started = time.perf_counter()
    tokens, cache_hits = {}, []
    for name, groups in splits.items():
        if token_tables is not None:  # sampled ids: re-encoding their text could give other tokens
            tokens[name], hit = token_tables[name], False
        else:
            tokens[name], hit = cached_tokens(tokenizer, key["tokenizer"], groups, cache_dir, workers)
        if hit:
            cache_hits.append(name)
    tokenized = time.perf_counter() - started

    autocast = torch.bfloat16 if key["dtype"] == "bfloat16" else None
    with contextlib.ExitStack() as stack:
        model = load_reference_model(model_path, device, load_in_4bit, trust_remote_code, stack)
        started = time.perf_counter()
        logps = {name: group_logps(model, tokens[name], max_length, truncation_mode, device, autocast)
                 for name in splits}
        computed = time.perf_counter() - started
        del model

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
    sequences = sum(len(g) for g in splits.values()) * group_size(layout)
    return {"train_groups": len(splits["train"]), "eval_groups": len(splits["eval"]), "sequences": sequences,
            "layout": layout, "tokenize_seconds": round(tokenized, 3), "token_cache": cache_hits,
            "forward_seconds": round(computed, 3), "key": key["key"], "output": str(output)}


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
                             compute_dtype(device, setting["load_in_4bit"]))
    try:
        return read_key(path).get("key") == expected["key"]
    except LexAlignError:
        return False
