"""Lineage files and model cards.

Each stage writes `lineage.json` beside its output: its resolved config, the
hashes of its inputs, the package versions, and the lineage of its parents, so
`results/aligned/lineage.json` tells the whole story of a checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

from lexalign.io import hash_path, read_json, write_json

LINEAGE_FILE = "lineage.json"
PACKAGES = ("lexalign", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "snakemake")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def read_lineage(path: str | Path) -> dict | None:
    file = Path(path) / LINEAGE_FILE
    return read_json(file) if file.is_file() else None


def stage_record(stage: str, config: dict[str, Any], inputs: dict[str, str | Path], extra: dict | None = None) -> dict:
    """The lineage of one stage: config, input hashes, versions, parents' lineage."""
    parents = {}
    hashes = {}
    for name, path in inputs.items():
        path = Path(path)
        hashes[name] = hash_path(path) if path.exists() else None
        parent = read_lineage(path) if path.is_dir() else None
        if parent:
            parents[name] = parent
    return {
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "inputs": {name: {"path": str(path), "sha256": hashes[name]} for name, path in inputs.items()},
        "versions": package_versions(),
        "parents": parents,
        **(extra or {}),
    }


def write_lineage(out_dir: str | Path, record: dict) -> None:
    write_json(Path(out_dir) / LINEAGE_FILE, record)


def _chain(record: dict) -> list[dict]:
    """Stages from the first to `record`, following the first parent of each."""
    chain = [record]
    while record.get("parents"):
        record = next(iter(record["parents"].values()))
        chain.append(record)
    return list(reversed(chain))


def write_model_card(out_dir: str | Path, record: dict, title: str, metrics: dict | None = None) -> None:
    """A Hub-style README.md (YAML front matter + prose) for a saved model."""
    cfg = record.get("config", {})
    method = cfg.get("method", record["stage"])
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- lexalign",
        f"- {method}",
        "---",
        "",
        f"# {title}",
        "",
        f"Produced by [LexAlign](https://example.invalid/lexalign) {record['versions'].get('lexalign')} "
        f"with transformers {record['versions'].get('transformers')} and TRL {record['versions'].get('trl')}.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        "```",
        "",
        "## How it was made",
        "",
    ]
    for step in _chain(record):
        summary = ", ".join(
            f"{k}={v}" for k, v in sorted(step.get("config", {}).items())
            if not isinstance(v, (dict, list)) and v is not None and k not in ("output_dir", "checkpoint_dir")
        )
        lines.append(f"- **{step['stage']}**: {summary}")
    reference = record.get("reference_model")
    if reference:
        lines += ["", f"Reference model (the starting point alignment is held close to): `{reference['path']}`, "
                      f"{reference['note']}."]
    if metrics:
        lines += ["", "## Training metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in sorted(metrics.items())]
    lines += ["", "The full lineage (configs, input hashes, package versions) is in `lineage.json`.", ""]
    from lexalign.io import atomic_write_text

    atomic_write_text(Path(out_dir) / "README.md", "\n".join(lines))
