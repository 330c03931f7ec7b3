"""The reference step: the reference model's log-probabilities of every response, computed once.

DPO and GDPO compare the policy with a frozen reference (the SFT model) on every
response of every step. Those reference log-probabilities never change, so this
step computes them once for the validated train and eval data and writes them to
one parquet file; align then reads them instead of running (or holding) the
reference model, in every epoch and every sweep run that shares the SFT model,
the data, `max_length` and the truncation.

The file (`results/reference/<data>/<layout>-<length>.parquet`) has one row per
group the trainer sees:

- `split` (train | eval) and `row`, the row's position in the validated split;
- `prompt_ids`, `completion_ids` (K lists, best first) and `scores` (K): the
  tokens exactly as the trainers make them (TRL's DPO tokenization: EOS added to
  each response, `prompt + response` tokenized with the tokenizer's defaults,
  the completion starting where prompt and prompt + response diverge);
- `ref_logps` (K): the reference's summed log-probability of each response,
  computed on the sequences the collator builds (truncated to `max_length`,
  right padded) with TRL's fused log-prob head, as the trainers compute it.

A layout is `pairs` (DPO: chosen, rejected, K = 2), `k<K>` (GDPO's ranked groups) or
`unpaired` (KTO: one completion per row with its label, and the KL term's mismatched
completion, so K = 2: the row's completion, then the KL completion; `scores` holds the
label, 1.0 desirable and 0.0 undesirable). ORPO, SimPO and CPO read no reference file.
The file's metadata holds its key: hashes of the reference model's weights, the
tokenizer and the groups, with the layout, `max_length`, the truncation, 4-bit
loading and the dtype; align refuses a file whose key differs from its own.

Tokenization is batched (the fast tokenizer's Rust batch encoder, parallel over
the cores for large batches) and cached between runs under a content key
(`results/cache/tokens/<key>.parquet`): a new SFT model on the same data and
tokenizer reuses the tokens and only reruns the forward passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lexalign import tokens
from lexalign.errors import LexAlignError
from lexalign.tokens import encode  # noqa: F401 - re-exported for callers of the old home

FORMAT = 2
"""Bumped when the file's layout or the computation changes (part of every key)."""
TRUNCATION_MODE = "keep_start"
"""DPOConfig's default, which align uses: longer sequences lose their end."""
METADATA_KEY = b"lexalign.reference"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_FILES = ("config.json", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")


# --- layouts and groups ----------------------------------------------------------------------------


def layout_for(method: str, group_size: int) -> str:
    """`k<K>` for GDPO's ranked groups of K, `unpaired` for KTO's rows, `pairs` for the others (DPO; ORPO,
    SimPO and CPO read pairs too, with no reference)."""
    if method == "gdpo":
        return f"k{group_size}"
    return "unpaired" if method == "kto" else "pairs"


SETTING_PATTERN = r"(pairs|unpaired|k\d+)-(max\d+|full)(-nf4)?"
"""A reference file's name (without .parquet): layout, max_length and 4-bit loading."""


def setting_name(alignment: dict) -> str:
    """The reference file an alignment reads, named by what the log-probs depend on: the layout (DPO pairs or
    GDPO's K), max_length and 4-bit loading; never beta or the loss, so runs differing only there share it."""
    length = f"max{alignment['max_length']}" if alignment["max_length"] else "full"
    quant = "-nf4" if alignment["load_in_4bit"] else ""
    return f"{layout_for(alignment['method'], alignment['group_delay_size'])}-{length}{quant}"


def parse_setting(name: str) -> dict:
    """The reference step's `setting` from a file name made by `setting_name`."""
    import re

    layout, length, quant = re.fullmatch(SETTING_PATTERN, name).groups()
    return {"layout": layout, "max_length": int(length[3:]) if length != "full" else None,
            "truncation_mode": TRUNCATION_MODE, "load_in_4bit": quant is not None}


def group_size(layout: str) -> int:
    if layout in ("pairs", "unpaired"):
        return 2
    if layout.startswith("k") and layout[1:].isdigit() and int(layout[1:]) >= 2:
        return int(layout[1:])
    raise ValueError(f"unknown reference layout {layout!r} (pairs or k<K>)")


@dataclass
class Groups:
    """The groups of one split as the trainer sees them: K responses per prompt, best first."""

    rows: list[int]
    """Position of each group's row in the split's frame."""
    prompts: list[str]
    responses: list[list[str]]
    scores: list[list[float]]
    dropped: int = 0
    """Rows with fewer than K responses (GDPO drops them)."""
    chat: bool = False
    """The texts were rendered by the model's chat template (`lexalign.tokens`: no special tokens added)."""

    def __len__(self) -> int:
        return len(self.rows)


KL_LOOKBACK = 64
"""How far back the KL term's mismatched completion is looked for (a row with another prompt)."""


def unpaired_rows(frame: pd.DataFrame) -> tuple[list[int], list[str], list[str], list[bool]]:
    """KTO's rows of a validated frame: (row, prompt, completion, label) of each. Unpaired data (completion and
    label columns) as they are; pairs split into one desirable row (chosen) and one undesirable row (rejected),
    side by side, so every batch holds both."""
    if not len(frame):
        return [], [], [], []
    if {"completion", "label"} <= set(frame.columns):
        return (list(range(len(frame))), frame["prompt"].astype(str).tolist(),
                frame["completion"].astype(str).tolist(), [bool(v) for v in frame["label"]])
    rows, prompts, completions, labels = [], [], [], []
    for i, (prompt, chosen, rejected) in enumerate(zip(frame["prompt"].astype(str), frame["chosen"].astype(str),
                                                       frame["rejected"].astype(str), strict=True)):
        rows += [i, i]
        prompts += [prompt, prompt]
        completions += [chosen, rejected]
        labels += [True, False]
    return rows, prompts, completions, labels


def kl_partners(prompts: list[str]) -> list[int]:
    """For each row, the row whose completion is its KL term's mismatched completion: the nearest earlier row
    (cyclically) with another prompt, else the row before. Fixed by the data alone, never by the batch size, so
    the reference step scores it once; with sequential batches almost every KL completion is one of the
    batch's own completions, paired with another prompt (as TRL's rotation within a batch)."""
    n = len(prompts)
    out = []
    for i in range(n):
        partner = (i - 1) % n
        for back in range(1, min(n, KL_LOOKBACK + 1)):
            if prompts[(i - back) % n] != prompts[i]:
                partner = (i - back) % n
                break
        out.append(partner)
    return out


def split_groups(frame: pd.DataFrame, layout: str, chat: bool | None = None) -> Groups:
    """The groups of `frame`: DPO's (prompt, chosen, rejected) pairs, GDPO's ranked groups of K, or KTO's rows
    (completion and KL completion, the label as the score)."""
    chat = tokens.chat_rendered(frame) if chat is None else chat
    if layout == "unpaired":
        rows, prompts, completions, labels = unpaired_rows(frame)
        partners = kl_partners(prompts)
        return Groups(rows, prompts, [[c, completions[j]] for c, j in zip(completions, partners, strict=True)],
                      [[float(label)] * 2 for label in labels], chat=bool(chat))
    if layout == "pairs":
        n = len(frame)
        if not n:
            return Groups([], [], [], [], chat=bool(chat))
        prompts = frame["prompt"].astype(str).tolist()
        chosen, rejected = frame["chosen"].astype(str), frame["rejected"].astype(str)
        responses = [list(pair) for pair in zip(chosen, rejected, strict=True)]
        return Groups(list(range(n)), prompts, responses, [[1.0, 0.0]] * n, chat=bool(chat))
    from lexalign.groups import iter_ranked_groups

    out, dropped = Groups([], [], [], [], chat=bool(chat)), 0
    for position, group in iter_ranked_groups(frame, group_size(layout)) if len(frame) else ():
        if group is None:
            dropped += 1
            continue
        out.rows.append(position)
        out.prompts.append(str(group["prompt"]))
        out.responses.append(group["responses"])
        out.scores.append(group["scores"])
    out.dropped = dropped
    return out


# --- keys ------------------------------------------------------------------------------------------


def _update(digest, text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def groups_hash(groups: Groups, with_scores: bool = True) -> str:
    """Content hash of the groups (prompts, responses in order, scores and rows)."""
    digest = hashlib.sha256()
    for i in range(len(groups)):
        _update(digest, groups.prompts[i])
        digest.update(len(groups.responses[i]).to_bytes(4, "little"))
        for response in groups.responses[i]:
            _update(digest, response)
        if with_scores:
            _update(digest, repr([groups.rows[i], *groups.scores[i]]))
    _update(digest, f"chat={groups.chat}")  # the same texts tokenize differently as chat or plain text
    return digest.hexdigest()


def _files_hash(paths: list[Path]) -> str:
    from lexalign.io import sha256_file

    digest = hashlib.sha256()
    for path in paths:
        _update(digest, f"{path.name}:{path.stat().st_size}:{sha256_file(path)}")
    return digest.hexdigest()


def weights_hash(model_path: str | Path) -> str:
    """Hash of a model folder's weights and config (for an adapter alone: its base's as well)."""
    path = Path(model_path)
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in MODEL_FILES))
    if not files:
        raise LexAlignError(f'No model weights in "{path}"',
                            hint="Run: lexalign finetune --config config/finetune.yaml")
    key = _files_hash(files)
    adapter = path / "adapter_config.json"
    if adapter.is_file() and not (path / "config.json").is_file():
        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        if Path(base).is_dir():
            key = hashlib.sha256((key + weights_hash(base)).encode()).hexdigest()
        else:
            key = hashlib.sha256((key + base).encode()).hexdigest()
    return key


def tokenizer_hash(tokenizer_path: str | Path) -> str:
    path = Path(tokenizer_path)
    return _files_hash(sorted(p for p in path.iterdir() if p.is_file() and p.name in TOKENIZER_FILES))


def compute_dtype(device: str, load_in_4bit: bool = False) -> str:
    """The dtype the reference runs in: the policy's (see models.load_causal_lm)."""
    import torch

    if load_in_4bit:
        return "nf4"
    return "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def reference_key(model_path: str | Path, tokenizer_path: str | Path, splits: dict[str, Groups], layout: str,
                  max_length: int | None, truncation_mode: str, load_in_4bit: bool, dtype: str) -> dict[str, Any]:
    """What the reference log-probs depend on, and one hash of it all (`key`)."""
    parts = {
        "format": FORMAT,
        "model": weights_hash(model_path),
        "tokenizer": tokenizer_hash(tokenizer_path),
        "data": {name: groups_hash(groups) for name, groups in splits.items()},
        "layout": layout,
        "max_length": max_length,
        "truncation_mode": truncation_mode,
        "load_in_4bit": bool(load_in_4bit),
        "dtype": dtype,
    }
    parts["key"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return parts


# --- tokenization ----------------------------------------------------------------------------------


def tokenize_groups(tokenizer, groups: Groups, workers: int | None = None) -> tuple[list, list]:
    """(prompt_ids, completion_ids) of every group, by LexAlign's one tokenization rule (`lexalign.tokens`):
    chat-rendered groups exactly as the model's template makes them, plain text with BOS and EOS once."""
    return tokens.tokenize_groups(tokenizer, groups.prompts, groups.responses, groups.chat, workers)


def token_table(tokenizer, groups: Groups, workers: int | None = None, chunk: int = 8192):
    """`tokenize_groups` into a pyarrow table (prompt_ids, completion_ids), `chunk` groups at a time,
    so a large dataset's tokens are held as int32 arrays rather than Python lists."""
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    pieces = []
    for start in range(0, len(groups), chunk):
        part = Groups(groups.rows[start:start + chunk], groups.prompts[start:start + chunk],
                      groups.responses[start:start + chunk], groups.scores[start:start + chunk], chat=groups.chat)
        prompt_ids, completion_ids = tokenize_groups(tokenizer, part, workers)
        pieces.append(pa.table({"prompt_ids": pa.array(prompt_ids, type=ids),
                                "completion_ids": pa.array(completion_ids, type=pa.list_(ids))}))
    if not pieces:
        return pa.table({"prompt_ids": pa.array([], type=ids), "completion_ids": pa.array([], type=pa.list_(ids))})
    return pa.concat_tables(pieces).combine_chunks()


def cached_tokens(tokenizer, tokenizer_key: str, groups: Groups, cache_dir: str | Path | None,
                  workers: int | None = None):
    """`token_table`, read from `cache_dir` when the same tokenizer saw the same texts before.

    Returns (the table, whether the cache answered).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = hashlib.sha256(f"{FORMAT}:{tokenizer_key}:{groups_hash(groups, with_scores=False)}".encode()).hexdigest()
    file = Path(cache_dir) / f"{key}.parquet" if cache_dir else None
    if file is not None and file.is_file():
        try:
            table = pq.read_table(file)
            if table.num_rows == len(groups):
                return table, True
        except (OSError, pa.ArrowException):
            pass  # a damaged cache entry: tokenize again and replace it
    table = token_table(tokenizer, groups, workers)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.parent / f".{file.name}.tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, file)
    return table, False


# --- the reference pass ----------------------------------------------------------------------------


def group_logps(model, pad_token_id: int, tokens, max_length: int | None, truncation_mode: str = TRUNCATION_MODE,
                batch_sequences: int = 32, device: str = "cpu", autocast_dtype=None,
                token_budget: int | None = None) -> list[list[float]]:
    """Summed log-prob of each response under `model` (with the lean head, `lexalign.logprobs`), [groups][K].

    `tokens`: a `token_table`. Each prompt + response is truncated as the trainers' collator truncates it
    (keep_start to `max_length`) and scored on its response tokens. Sequences are packed padding-free into
    batches of at most `token_budget` tokens (`lexalign.packing`); a model that cannot take packed input is
    scored in padded batches of `batch_sequences` built by the trainers' collator, longest groups first.
    """
    import numpy as np
    import torch

    from lexalign import packing

    n = tokens.num_rows
    if not n:
        return []
    prompts = tokens.column("prompt_ids").to_pylist()
    completions = tokens.column("completion_ids").to_pylist()
    k = len(completions[0])
    autocast = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype is not None \
        else contextlib.nullcontext()
    if not packing.supports_packing(model):
        return _padded_group_logps(model, pad_token_id, tokens, max_length, truncation_mode, batch_sequences,
                                   device, autocast)
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


def _padded_group_logps(model, pad_token_id: int, tokens, max_length, truncation_mode, batch_sequences, device,
                        autocast) -> list[list[float]]:
    """`group_logps` in padded batches built by the trainers' collator (response-major, right padded)."""
    import numpy as np
    import pyarrow.compute as pc
    import torch

    from lexalign.train.gdpo import DataCollatorForRankedPreference

    n = tokens.num_rows
    completions = tokens.column("completion_ids")
    k = len(completions[0])
    prompt_lengths = pc.list_value_length(tokens.column("prompt_ids")).to_numpy()
    completion_lengths = pc.list_value_length(pc.list_flatten(completions)).to_numpy().reshape(n, k)
    order = np.argsort(-(prompt_lengths + completion_lengths.max(axis=1)), kind="stable")
    collate = DataCollatorForRankedPreference(pad_token_id=pad_token_id, max_length=max_length,
                                              truncation_mode=truncation_mode)
    per_batch = max(1, batch_sequences // k)
    out: list = [None] * n
    with torch.inference_mode(), autocast:
        for start in range(0, n, per_batch):
            index = order[start:start + per_batch]
            rows = tokens.take(index).to_pylist()
            batch = collate([{**row, "scores": [0.0] * k} for row in rows])
            completion_mask = batch["completion_mask"]
            labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
            outputs = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                            labels=labels.to(device), use_cache=False, fused_lm_head=True)
            seq_len = completion_mask.size(1) - 1
            logps = outputs.log_probs[:, -seq_len:].sum(dim=1).float()
            for position, values in zip(index.tolist(), logps.view(k, len(index)).T.cpu().tolist(), strict=True):
                out[position] = values
    return out


def load_reference_model(model_path: Path, device: str, load_in_4bit: bool, trust_remote_code: bool,
                         stack: contextlib.ExitStack):
    """The reference model as align's policy starts: the SFT weights (an adapter alone merged into its base)."""
    from trl.trainer.utils import disable_dropout_in_model

    from lexalign import models
    from lexalign.logprobs import add_lean_lm_head

    path = models.require_model(model_path, "lexalign finetune --config config/finetune.yaml")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
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
                      batch_sequences: int | None = None, workers: int | None = None,
                      token_tables: dict | None = None) -> dict:
    """Compute the reference log-probs of every train and eval group into `output` (parquet); return a summary.

    `token_tables` (split → token table, in the groups' order): ids to use instead of tokenizing the text (an
    online round's sampled ids: `lexalign.online.rounds.sampled_token_tables`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from lexalign import models

    model_path = Path(model_path)
    tokenizer_path = Path(tokenizer_path or model_path)
    group_size(layout)  # validates the layout
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
        logps = {name: group_logps(model, tokenizer.pad_token_id, tokens[name], max_length, truncation_mode,
                                   batch_sequences or (64 if device == "cuda" else 32), device, autocast)
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


# --- reading it back (align) ------------------------------------------------------------------------


def read_key(path: str | Path) -> dict:
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in metadata:
        raise LexAlignError(f'"{path}" is not a LexAlign reference file',
                            hint="Compute it with: snakemake --cores 1 <that file>")
    return json.loads(metadata[METADATA_KEY])


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


def check_key(path: str | Path, found: dict, expected: dict) -> None:
    """Refuse reference log-probs computed for another model, tokenizer, data or setting."""
    if found.get("key") == expected["key"]:
        return
    names = {"model": "the SFT model's weights", "tokenizer": "the tokenizer", "data": "the preference data",
             "layout": "the method (DPO pairs, GDPO's K or KTO's rows)", "max_length": "max_length",
             "truncation_mode": "the truncation", "load_in_4bit": "load_in_4bit", "dtype": "the dtype (device)",
             "format": "the file format (an older LexAlign)"}
    differ = [names[k] for k in names if found.get(k) != expected.get(k)] or ["its key"]
    raise LexAlignError(
        f'The reference log-probs in "{path}" were computed for other inputs',
        f"Different: {', '.join(differ)}",
        hint="Recompute them (snakemake reruns the reference rule), or align without them",
    )


def load_reference(path: str | Path) -> dict:
    """The reference file's rows per split (pyarrow tables), in the order of the groups."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return {name: table.filter(pc.equal(table.column("split"), name)) for name in ("train", "eval")}


def trainer_dataset(table, layout: str):
    """A tokenized `datasets.Dataset` with the reference log-probs, in the columns the trainer reads.

    DPO: prompt_ids, chosen_ids, rejected_ids, ref_chosen_logps, ref_rejected_logps.
    GDPO: prompt_ids, completion_ids, scores, ref_logps.
    KTO: prompt_ids, completion_ids, KL_completion_ids, label, ref_logps, ref_KL_logps.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if table.num_rows == 0:
        return None
    scored = "ref_logps" in table.column_names  # without: the trainer runs the reference itself
    if layout == "pairs":
        completions = table.column("completion_ids")
        columns = {
            "prompt_ids": table.column("prompt_ids"),
            "chosen_ids": pc.list_element(completions, 0),
            "rejected_ids": pc.list_element(completions, 1),
        }
        if scored:
            logps = table.column("ref_logps")
            columns.update(ref_chosen_logps=pc.list_element(logps, 0), ref_rejected_logps=pc.list_element(logps, 1))
    elif layout == "unpaired":
        completions = table.column("completion_ids")
        columns = {
            "prompt_ids": table.column("prompt_ids"),
            "completion_ids": pc.list_element(completions, 0),
            "KL_completion_ids": pc.list_element(completions, 1),
            "label": pc.greater(pc.list_element(table.column("scores"), 0), 0.5),
        }
        if scored:
            logps = table.column("ref_logps")
            columns.update(ref_logps=pc.list_element(logps, 0), ref_KL_logps=pc.list_element(logps, 1))
    else:
        names = ("prompt_ids", "completion_ids", "scores", "ref_logps") if scored else \
            ("prompt_ids", "completion_ids", "scores")
        columns = {name: table.column(name) for name in names}
    return Dataset(InMemoryTable(pa.table(columns)))


def tokenized_dataset(tokenizer, frame: pd.DataFrame, layout: str, split: str, workers: int | None = None):
    """A split tokenized for the trainer without reference log-probs (align without the reference step).

    The same tokens as the reference step's (`lexalign.tokens`), so training
    never falls back to TRL's own tokenization of rendered chat text."""
    import pyarrow as pa

    groups = split_groups(frame, layout)
    if layout not in ("pairs", "unpaired"):
        from lexalign.train.gdpo import check_groups

        check_groups(len(groups), groups.dropped, len(frame), group_size(layout), split)
    table = token_table(tokenizer, groups, workers)
    table = table.append_column("scores", pa.array(groups.scores, type=pa.list_(pa.float64())))
    return trainer_dataset(table, layout)
