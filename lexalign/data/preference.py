"""Validate a preference dataset: every row is kept or rejected with a reason.

Output (`write_outputs`): `train.parquet`, `eval.parquet`, `rejects.jsonl` and
`report.json`. Kept plus rejected always equals the rows read.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from lexalign.config.stages import DatasetConfig
from lexalign.data.common import in_eval_split, reject_record
from lexalign.data.load import read_records
from lexalign.errors import LexAlignError

COLUMNS = ["prompt", "chosen", "rejected"]


def _missing_field_error(field: str, available: list[str]) -> LexAlignError:
    return LexAlignError(
        f'Dataset missing required field "{field}"',
        f"Available fields: {', '.join(available) or '(none)'}",
        hint="Expected format: {prompt: str, chosen: str, rejected: str}",
    )


def _check_row(row: dict, fields: dict[str, str]) -> tuple[dict | None, dict | None]:
    values = {}
    for column, field in fields.items():
        value = row.get(field)
        if value is None or (isinstance(value, float) and value != value):
            return None, reject_record(row, "null_field", f"{field} is null")
        if not isinstance(value, str):
            return None, reject_record(row, "non_string_field", f"{field} is {type(value).__name__}")
        if not value.strip():
            return None, reject_record(row, "empty_field", f"{field} is empty")
        values[column] = value
    if values["chosen"] == values["rejected"]:
        return None, reject_record(row, "chosen_equals_rejected")
    values["source_row"] = row.get("_row")
    return values, None


def _token_lengths(tokenizer, prompts: list[str], responses: list[str]) -> list[int]:
    """Tokens of prompt + response (+1 for the EOS the trainer appends)."""
    encoded = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=False)["input_ids"]
    return [len(ids) + 1 for ids in encoded]


def _apply_length_policy(kept: list[dict], cfg: DatasetConfig, tokenizer, rejects: list[dict]) -> tuple[list[dict], dict]:
    if not kept:
        return kept, {}
    prompts = [r["prompt"] for r in kept]
    chosen_len = _token_lengths(tokenizer, prompts, [r["chosen"] for r in kept])
    rejected_len = _token_lengths(tokenizer, prompts, [r["rejected"] for r in kept])
    longest = [max(a, b) for a, b in zip(chosen_len, rejected_len)]
    too_long = [i for i, n in enumerate(longest) if n > cfg.max_length]
    stats = {
        "tokens": {f"p{q}": float(pd.Series(longest).quantile(q / 100)) for q in (50, 90, 99)} | {"max": max(longest)},
        "over_max_length": len(too_long),
        "over_max_length_share": len(too_long) / len(kept),
        "length_policy": cfg.length_policy,
    }
    if too_long and cfg.length_policy == "fail":
        first = kept[too_long[0]]
        raise LexAlignError(
            f"{len(too_long)} of {len(kept)} rows exceed max_length {cfg.max_length} tokens",
            f"First: row {first['source_row']} with {longest[too_long[0]]} tokens",
            hint="Raise dataset.max_length, or set dataset.length_policy to drop or truncate",
        )
    if not too_long:
        return kept, stats
    out = []
    long_set = set(too_long)
    for i, row in enumerate(kept):
        if i not in long_set:
            out.append(row)
        elif cfg.length_policy == "drop":
            rejects.append(reject_record({**row, "_row": row["source_row"]}, "too_long", f"{longest[i]} tokens > {cfg.max_length}"))
        else:
            truncated = _truncate(row, tokenizer, cfg.max_length)
            if truncated is None:
                rejects.append(reject_record({**row, "_row": row["source_row"]}, "prompt_too_long", f"prompt alone fills {cfg.max_length} tokens"))
            else:
                out.append(truncated)
    return out, stats


def _truncate(row: dict, tokenizer, max_length: int) -> dict | None:
    prompt_tokens = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
    budget = max_length - prompt_tokens - 1
    if budget < 1:
        return None
    out = dict(row)
    for key in ("chosen", "rejected"):
        ids = tokenizer(row[key], add_special_tokens=False)["input_ids"][:budget]
        out[key] = tokenizer.decode(ids)
    return out if out["chosen"] != out["rejected"] else None


def validate_preferences(cfg: DatasetConfig, tokenizer, seed: int = 42) -> dict[str, Any]:
    """Read, check and split the data. Returns train/eval frames, rejects and the report."""
    rows, rejects = read_records(cfg.path, cfg.format, cfg.train_split)
    eval_rows: list[dict] = []
    if cfg.eval_split:
        eval_rows, eval_bad = read_records(cfg.path, cfg.format, cfg.eval_split)
        rejects += eval_bad
    total = len(rows) + len(eval_rows) + len(rejects)
    fields = {"prompt": cfg.prompt_field, "chosen": cfg.chosen_field, "rejected": cfg.rejected_field}
    available = sorted({k for r in rows[:1000] for k in r if not k.startswith("_")})
    for field in fields.values():
        if rows and all(field not in r for r in rows[:1000]):
            raise _missing_field_error(field, available)

    def check(batch: list[dict]) -> list[dict]:
        kept, seen = [], set()
        for row in batch:
            if any(f not in row for f in fields.values()):
                missing = next(f for f in fields.values() if f not in row)
                rejects.append(reject_record(row, "missing_field", missing))
                continue
            value, bad = _check_row(row, fields)
            if bad:
                rejects.append(bad)
                continue
            key = (value["prompt"], value["chosen"], value["rejected"])
            if key in seen:
                rejects.append(reject_record(row, "duplicate_row"))
                continue
            seen.add(key)
            kept.append(value)
        return kept

    train = check(rows)
    evals = check(eval_rows)
    train, length_stats = _apply_length_policy(train, cfg, tokenizer, rejects)
    evals, _ = _apply_length_policy(evals, cfg, tokenizer, rejects)
    if cfg.eval_split:
        train_prompts = {r["prompt"] for r in train}
        leaked = [r for r in evals if r["prompt"] in train_prompts]
        evals = [r for r in evals if r["prompt"] not in train_prompts]
        rejects += [reject_record({**r, "_row": r["source_row"]}, "prompt_in_train_and_eval") for r in leaked]
    else:
        evals = [r for r in train if in_eval_split(r["prompt"], cfg.eval_fraction, seed)]
        train = [r for r in train if not in_eval_split(r["prompt"], cfg.eval_fraction, seed)]

    reasons = Counter(r["reason"] for r in rejects)
    report = {
        "source": str(cfg.path),
        "input_rows": total,
        "train_rows": len(train),
        "eval_rows": len(evals),
        "rejected_rows": len(rejects),
        "reject_reasons": dict(sorted(reasons.items())),
        "reject_fraction": len(rejects) / total if total else 0.0,
        "max_reject_fraction": cfg.max_reject_fraction,
        "responses_per_prompt": {"2": len(train) + len(evals)},
        "lengths": length_stats,
    }
    assert report["train_rows"] + report["eval_rows"] + report["rejected_rows"] == total, "rows lost in validation"
    frame = lambda rows_: pd.DataFrame(rows_, columns=COLUMNS + ["source_row"])  # noqa: E731
    return {"train": frame(train), "eval": frame(evals), "rejects": rejects, "report": report}


def summary(report: dict) -> str:
    lines = [
        f"Validated {report['input_rows']} rows from {report['source']}: "
        f"kept {report['train_rows']} train + {report['eval_rows']} eval, rejected {report['rejected_rows']} "
        f"({100 * report['reject_fraction']:.1f}%)"
    ]
    for reason, count in report["reject_reasons"].items():
        lines.append(f"  {reason}: {count}")
    tokens = report.get("lengths", {}).get("tokens")
    if tokens:
        lines.append(f"  length in tokens: p50 {tokens['p50']:.0f}, p90 {tokens['p90']:.0f}, max {tokens['max']}")
    return "\n".join(lines)


def gate(report: dict, where: str) -> None:
    """Stop before training when the data is not fit to train on."""
    if report["train_rows"] == 0:
        raise LexAlignError(f"No usable training rows in {report['source']}", summary(report),
                            hint=f"See the rejects in {where}/rejects.jsonl")
    if report["reject_fraction"] > report["max_reject_fraction"]:
        raise LexAlignError(
            f"{100 * report['reject_fraction']:.1f}% of rows were rejected, above max_reject_fraction "
            f"{100 * report['max_reject_fraction']:.0f}%",
            summary(report),
            hint=f"Fix the data (see {where}/rejects.jsonl) or raise dataset.max_reject_fraction",
        )


def is_validated_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "report.json").is_file() and (path / "train.parquet").is_file()
