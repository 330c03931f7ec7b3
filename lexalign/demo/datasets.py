"""Write the demo datasets as JSONL files, as a user's own data would arrive."""

from __future__ import annotations

import json
from pathlib import Path

from lexalign.demo import task

SIZES = task.DemoSizes()


def write(kind: str, out_dir: Path, seed: int) -> int:
    """Write `train.jsonl` for `sft_data` or `preference_data`; return the row count.

    The preference data ranks four responses per prompt (polite > neutral >
    curt > rude): DPO reads it as best-vs-worst pairs, GDPO as groups of K.
    """
    if kind == "sft_data":
        rows = task.sft_rows(seed, SIZES.sft_rows)
    elif kind == "preference_data":
        rows = task.ranked_rows(seed, SIZES.preference_rows, k=4)
    else:
        raise ValueError(f"the demo has no {kind}")
    with (Path(out_dir) / "train.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return len(rows)
