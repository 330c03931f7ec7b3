"""Prepare SFT data: plain text, prompt/completion, or chat messages.

The shape is detected from the configured fields; rows are normalised to the
columns TRL's SFTTrainer reads as they are (`text`, `prompt`+`completion`, or
`messages`), split into train and eval, and every dropped row is kept in
`rejects.jsonl` with its reason.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pandas as pd

from lexalign.config.sections import SftDatasetConfig
from lexalign.core.errors import LexAlignError
from lexalign.data.common import in_eval_split, reject_record
from lexalign.data.load import read_records
from lexalign.data.splits import resolve_data_dir


def detect_shape(rows: list[dict], cfg: SftDatasetConfig) -> str:
    keys = {k for r in rows[:1000] for k in r if not k.startswith("_")}
    if cfg.messages_field in keys:
        return "messages"
    if cfg.prompt_field in keys and cfg.completion_field in keys:
        return "prompt_completion"
    if cfg.text_field in keys:
        return "text"
    raise LexAlignError(
        "SFT dataset has none of the supported shapes",
        f"Available fields: {', '.join(sorted(keys)) or '(none)'}",
        hint=f"Expected {{{cfg.text_field}: str}}, {{{cfg.prompt_field}: str, {cfg.completion_field}: str}} "
        f"or {{{cfg.messages_field}: [{{role, content}}, …]}} (set sft_data.*_field to map yours)",
    )


def _check_messages(value: Any) -> str | None:
    if not isinstance(value, (list, tuple)) or not value:
        return "messages is not a non-empty list"
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            return "a message lacks role or string content"
    if value[-1]["role"] != "assistant":
        return "conversation does not end with an assistant turn"
    return None


def _normalise(rows: list[dict], shape: str, cfg: SftDatasetConfig, rejects: list[dict]) -> list[dict]:
    """Rows in the shape TRL reads; the others go to `rejects` with their reason."""
    kept = []
    for row in rows:
        if shape == "messages":
            problem = _check_messages(row.get(cfg.messages_field))
            if problem:
                rejects.append(reject_record(row, "bad_messages", problem))
                continue
            kept.append({"messages": [{"role": m["role"], "content": m["content"]} for m in row[cfg.messages_field]]})
            continue
        fields = [cfg.prompt_field, cfg.completion_field] if shape == "prompt_completion" else [cfg.text_field]
        bad = next((f for f in fields if not isinstance(row.get(f), str) or not row[f].strip()), None)
        if bad:
            rejects.append(reject_record(row, "empty_or_non_string_field", bad))
            continue
        if shape == "prompt_completion":
            kept.append({"prompt": row[cfg.prompt_field], "completion": row[cfg.completion_field]})
        else:
            kept.append({"text": row[cfg.text_field]})
    return kept


def prepare_sft(cfg: SftDatasetConfig, seed: int = 42) -> dict[str, Any]:
    root = resolve_data_dir(cfg.path, cfg.data_dir)
    rows, rejects = read_records(root, cfg.format, cfg.train_split)
    eval_rows: list[dict] = []
    if cfg.eval_split:
        eval_rows, eval_rejects = read_records(root, cfg.format, cfg.eval_split, exact=True)
        rejects += eval_rejects
    total = len(rows) + len(eval_rows) + len(rejects)
    shape = detect_shape(rows, cfg) if rows else "text"
    kept = _normalise(rows, shape, cfg, rejects)

    def key(row: dict) -> str:
        return str(row.get("prompt") or row.get("text") or row["messages"][0]["content"])

    if cfg.eval_split:
        train, evals = kept, _normalise(eval_rows, shape, cfg, rejects)
    else:
        evals = [r for r in kept if in_eval_split(key(r), cfg.eval_fraction, seed)]
        train = [r for r in kept if not in_eval_split(key(r), cfg.eval_fraction, seed)]
    if not train:
        raise LexAlignError(f"No usable SFT rows in {root}", f"{len(rejects)} of {total} rows rejected")
    report = {
        "source": str(root),
        "eval_split": cfg.eval_split,
        "shape": shape,
        "input_rows": total,
        "train_rows": len(train),
        "eval_rows": len(evals),
        "rejected_rows": len(rejects),
        "reject_reasons": dict(Counter(r["reason"] for r in rejects)),
    }
    columns = list(train[0])
    return {"train": pd.DataFrame(train, columns=columns), "eval": pd.DataFrame(evals, columns=columns),
            "rejects": rejects, "report": report}
