"""Shared by the data stages: reject records, prompt-level splits, atomic outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lexalign.io import atomic_dir, write_json


def reject_record(row: dict, reason: str, detail: str = "") -> dict:
    """A rejects.jsonl entry: where the row was, why it was dropped, and the row itself."""
    original = {k: v for k, v in row.items() if not k.startswith("_")}
    return {"row": row.get("_row"), "file": row.get("_file"), "reason": reason, "detail": detail, "data": original}


def in_eval_split(prompt: str, fraction: float, seed: int) -> bool:
    """Deterministic by prompt, so every row of one prompt lands on the same side."""
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def write_split_outputs(out_dir: str | Path, result: dict, lineage: dict | None = None) -> None:
    with atomic_dir(out_dir) as tmp:
        result["train"].to_parquet(tmp / "train.parquet", index=False)
        result["eval"].to_parquet(tmp / "eval.parquet", index=False)
        with (tmp / "rejects.jsonl").open("w", encoding="utf-8") as handle:
            for reject in result["rejects"]:
                handle.write(json.dumps(reject, default=str, ensure_ascii=False) + "\n")
        write_json(tmp / "report.json", result["report"])
        if lineage:
            write_json(tmp / "lineage.json", lineage)
