"""Write the demo datasets as JSONL files, as a user's own data would arrive."""

from __future__ import annotations

import json
from pathlib import Path

from lexalign.demo import task

SIZES = task.DemoSizes()


def write(kind: str, out_dir: Path, seed: int) -> int:
    """Write `train.jsonl` for `sft_data` or `preference_data`; return the row count."""
    if kind == "sft_data":
        rows = task.sft_rows(seed, SIZES.sft_rows)
    elif kind == "preference_data":
        rows = task.preference_rows(seed, SIZES.preference_rows)
    else:
        raise ValueError(f"the demo has no {kind}")
    with (Path(out_dir) / "train.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return len(rows)
