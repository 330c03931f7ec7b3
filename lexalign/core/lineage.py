"""Lineage files and model cards.

Each step that makes a folder writes `lineage.json` beside it (its `stage`: which step): its resolved config, the
hashes of its inputs, the package versions, and the lineage of its parents, so
`results/aligned/lineage.json` tells the whole story of a checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

from lexalign.core.io import hash_path, read_json, write_json

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


def _parents(record: dict) -> list[dict]:
    """A record's parents, the model's first (lineage.json sorts its keys: `data` would come first)."""
    parents = record.get("parents") or {}
    return [parents[name] for name in sorted(parents, key=lambda name: (name != "model", name))]


def _chain(record: dict) -> list[dict]:
    """Stages from the first to `record`, following the model's parent (else the first parent) of each."""
    chain = [record]
    while _parents(record):
        record = _parents(record)[0]
        chain.append(record)
    return list(reversed(chain))


def _records(record: dict):
    """Every stage record of a lineage tree, `record` first, then each parent's tree in order."""
    yield record
    for parent in _parents(record):
        yield from _records(parent)


def readme_metadata(folder: str | Path) -> dict:
    """The YAML front matter of a folder's README.md (a Hub model card), or {}."""
    import yaml

    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    head = text[3:].split("\n---", 1)[0]
    try:
        data = yaml.safe_load(head)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def sources(record: dict) -> list[dict]:
    """Where a model's lineage began: every download (the model, the SFT data, the preference data) with its
    source, repo or path, the revision asked for and the commit it resolved to."""
    out, seen = [], set()
    for step in _records(record):
        if step.get("stage") != "download":
            continue
        cfg = step.get("config", {})
        entry = {"kind": cfg.get("kind"), "source": cfg.get("source"), "repo_id": cfg.get("repo_id"),
                 "path": cfg.get("path"), "revision": cfg.get("revision") if cfg.get("source") == "hub" else None,
                 "resolved_revision": step.get("resolved_revision"), "license": step.get("license")}
        key = (entry["kind"], entry["source"], entry["repo_id"], entry["path"])
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


def is_adapter(record: dict) -> bool:
    """A model folder holding a PEFT adapter alone (finetune with LoRA/QLoRA and merge: false)."""
    cfg = record.get("config", {})
    return record.get("stage") == "finetune" and cfg.get("method") in ("lora", "qlora") and cfg.get("merge") is False


def card_metadata(record: dict, adapter: bool | None = None) -> dict:
    """The card's YAML metadata, as the Hub reads it: library, pipeline tag, base model, datasets, license, tags."""
    adapter = is_adapter(record) if adapter is None else adapter
    cfg = record.get("config", {})
    found = sources(record)
    base = next((s for s in found if s["kind"] == "model" and s["source"] == "hub" and s["repo_id"]), None)
    datasets = list(dict.fromkeys(s["repo_id"] for s in found
                                  if s["kind"] != "model" and s["source"] == "hub" and s["repo_id"]))
    meta: dict = {"library_name": "peft" if adapter else "transformers", "pipeline_tag": "text-generation"}
    if base:
        meta["base_model"] = base["repo_id"]
        meta["base_model_relation"] = "adapter" if adapter else "finetune"
    if datasets:
        meta["datasets"] = datasets
    license_ = next((s["license"] for s in found if s["kind"] == "model" and s.get("license")), None)
    if license_:
        meta["license"] = license_
    method = str(cfg.get("method", record.get("stage", "model")))
    tags = ["lexalign", method]
    if record.get("stage") == "align":
        tags += ["trl", "alignment"]
    elif record.get("stage") == "finetune":
        tags += ["trl", "sft"]
    if adapter or cfg.get("use_lora") or method in ("lora", "qlora"):
        tags += ["peft", "lora"]
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a rate measured on n samples."""
    import math

    if n <= 0:
        return 0.0, 1.0
    denominator = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _fmt(value, digits: str = ".3f") -> str:
    return "—" if value is None else format(value, digits) if isinstance(value, float) else str(value)


def evaluation_lines(evaluation: dict, record: dict) -> list[str]:
    """The eval table: the reference (SFT) model against the aligned one, the judge with its 95% interval."""
    reference = record.get("reference_model") or {}
    before = "SFT model" if reference.get("sft", True) else "starting model"
    lines = ["## Evaluation", "",
             f"On {evaluation.get('pairs', '?')} held-out preference pairs, against the {before} "
             f"(the reference, β = {evaluation.get('beta', '?')}):", "",
             f"| figure | {before} | aligned model |", "| --- | --- | --- |",
             f"| preference accuracy (implicit reward ranks chosen above rejected) | — | "
             f"{_fmt(evaluation.get('preference_accuracy'))} |",
             f"| mean reward margin | — | {_fmt(evaluation.get('mean_margin'))} |",
             f"| log-prob accuracy (chosen more likely than rejected) | "
             f"{_fmt(evaluation.get('logp_accuracy_reference'))} | {_fmt(evaluation.get('logp_accuracy_policy'))} |"]
    if evaluation.get("kl_estimate") is not None:
        lines.append(f"| KL(aligned ‖ {before}) per prompt, nats | 0 | {_fmt(evaluation['kl_estimate'])} |")
    if "kendall_tau" in evaluation:
        k, groups = evaluation.get("ranking_k"), evaluation.get("ranking_groups")
        lines += [f"| Kendall's τ of rewards against the ranking (K = {k}, {groups} groups) | — | "
                  f"{_fmt(evaluation['kendall_tau'])} |",
                  f"| ranked pair accuracy | — | {_fmt(evaluation.get('pair_accuracy'))} |",
                  f"| top-1 accuracy | — | {_fmt(evaluation.get('top1_accuracy'))} |"]
    judged = evaluation.get("generation")
    if judged:
        n = int(judged.get("prompts") or 0)
        cells = []
        for name in ("sft", "aligned"):
            rate = judged.get(f"{name}_rate")
            if rate is None:
                cells.append("—")
                continue
            low, high = judged.get(f"{name}_rate_interval") or wilson_interval(rate, n)
            cells.append(f"{100 * rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}]")
        lines.append(f"| judged wanted behaviour ({judged.get('judge')}, {judged.get('decoding')} decoding, "
                     f"{n} prompts; 95% interval) | {cells[0]} | {cells[1]} |")
    return lines + [""]


def model_card(record: dict, title: str | None = None, metrics: dict | None = None, evaluation: dict | None = None,
               adapter: bool | None = None) -> str:
    """A Hub model card (README.md): YAML metadata the Hub renders (base model, datasets, license, tags), then
    the eval table (when an evaluation is given), the training configuration and the lineage (sources and
    the commits they resolved to, every stage)."""
    import yaml

    adapter = is_adapter(record) if adapter is None else adapter
    cfg = record.get("config", {})
    versions = record.get("versions", {})
    metrics = record.get("metrics") if metrics is None else metrics
    title = title or record.get("title") or f"{record.get('stage', 'LexAlign')} model"
    meta = card_metadata(record, adapter)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {title}", "",
             f"Produced by [LexAlign](https://example.invalid/lexalign) {versions.get('lexalign')} "
             f"with transformers {versions.get('transformers')} and TRL {versions.get('trl')}.", "", "```python"]
    if adapter:
        base = meta.get("base_model", "<the base model>")
        lines += ["from peft import AutoPeftModelForCausalLM",
                  'model = AutoPeftModelForCausalLM.from_pretrained("<this repo or folder>")',
                  f"# the adapter of {base}: PEFT loads the base model and applies it"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
                  'tokenizer = AutoTokenizer.from_pretrained("<this folder>")']
    lines += ["```", ""]
    if evaluation:
        lines += evaluation_lines(evaluation, record)
    lines += ["## Training configuration", "", f"Stage `{record.get('stage')}`:", "", "| key | value |",
              "| --- | --- |"]
    lines += [f"| {k} | {', '.join(map(str, v)) if isinstance(v, list) else v} |" for k, v in sorted(cfg.items())
              if v is not None and not isinstance(v, dict) and k not in ("output_dir", "checkpoint_dir")
              and v != []]
    reference = record.get("reference_model")
    if reference:
        lines += ["", f"Reference model (the starting point alignment is held close to): `{reference['path']}`, "
                      f"{reference['note']}."]
    if metrics:
        lines += ["", "## Training metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in sorted(metrics.items())]
    found = sources(record)
    lines += ["", "## Lineage", ""]
    if found:
        lines += ["| source | of | repo or path | revision | resolved commit |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {s['source']} | {s['kind']} | {s['repo_id'] or s['path'] or '(built-in demo)'} | "
                  f"{s['revision'] or '—'} | {s['resolved_revision'] or '—'} |" for s in found]
        lines.append("")
    lines += ["### How it was made", ""]
    for step in _chain(record):
        summary = ", ".join(
            f"{k}={v}" for k, v in sorted(step.get("config", {}).items())
            if not isinstance(v, (dict, list)) and v is not None and k not in ("output_dir", "checkpoint_dir")
        )
        lines.append(f"- **{step['stage']}**: {summary}")
    lines += ["", "The full lineage (configs, input hashes, package versions) is in `lineage.json`.", ""]
    return "\n".join(lines)


def write_model_card(out_dir: str | Path, record: dict, title: str, metrics: dict | None = None) -> None:
    """A Hub-style README.md (YAML front matter + prose) for a saved model (no evaluation yet: `lexalign push`
    and the publish rule write the card again with it)."""
    from lexalign.core.io import atomic_write_text

    atomic_write_text(Path(out_dir) / "README.md", model_card(record, title, metrics))
