"""What the reference log-probs depend on, hashed into the key a reference file carries in its metadata.

The key holds hashes of the reference model's weights, the tokenizer's files
and the groups, with the layout, `max_length`, the truncation, 4-bit loading
and the dtype; align refuses a file whose key differs from its own (`check_key`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lexalign.core.errors import LexAlignError
from lexalign.core.paths import TOKENIZER_FILES, adapter_base, lone_adapter
from lexalign.reference.layout import Groups

FORMAT = 2
"""Bumped when the file's layout or the computation changes (part of every key)."""
METADATA_KEY = b"lexalign.reference"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_FILES = ("config.json", "adapter_config.json")


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
    from lexalign.core.io import sha256_file

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
    if lone_adapter(path):
        base = adapter_base(path)
        if Path(base).is_dir():
            key = hashlib.sha256((key + weights_hash(base)).encode()).hexdigest()
        else:
            key = hashlib.sha256((key + base).encode()).hexdigest()
    return key


LOADER_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")
"""Keys transformers writes into tokenizer_config.json about how the tokenizer was loaded, not how it tokenizes."""
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def tokenizer_hash(tokenizer_path: str | Path) -> str:
    """What makes the tokenizer tokenize as it does: its files, with tokenizer_config.json read as the tokenizer
    `load_tokenizer` makes of it. A tokenizer saved again by transformers (each aligned model's folder holds one)
    hashes as its source: 5.x adds loader keys (`LOADER_KEYS`), moves the chat template from the config into
    chat_template.jinja, and writes the pad token `load_tokenizer` set to the EOS token where there was none."""
    path = Path(tokenizer_path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name in TOKENIZER_FILES)
    parts: dict[str, Any] = {"files": {}, "chat_template": None}
    for file in files:
        if file.name == "tokenizer_config.json":
            try:
                config = json.loads(file.read_text(encoding="utf-8"))
            except ValueError:
                config = None
            if isinstance(config, dict):
                for key in LOADER_KEYS:
                    config.pop(key, None)
                if "chat_template" in config:
                    parts["chat_template"] = config.pop("chat_template")
                if _token_text(config.get("pad_token")) in (None, _token_text(config.get("eos_token"))):
                    config.pop("pad_token", None)
                parts["config"] = config
                continue
        if file.name in TEMPLATE_FILES:
            text = file.read_text(encoding="utf-8", errors="replace")
            try:
                read = json.loads(text) if file.suffix == ".json" else text
            except ValueError:  # a damaged file still keys by its text; loading the tokenizer names the problem
                read = text
            parts["chat_template"] = read.get("chat_template") if isinstance(read, dict) else read
            continue
        parts["files"][file.name] = _files_hash([file])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def compute_dtype(device: str, load_in_4bit: bool = False, bf16: bool | str | None = None) -> str:
    """The dtype the reference runs in: the policy's (see models.load_causal_lm; `bf16`: the alignment's)."""
    from lexalign.models.loading import training_bf16

    if load_in_4bit:
        return "nf4"
    return "bfloat16" if training_bf16(device, bf16) else "float32"


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


def read_key(path: str | Path) -> dict:
    """The key in a reference file's metadata, or a clear error for a file that is none."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in metadata:
        raise LexAlignError(f'"{path}" is not a LexAlign reference file',
                            hint="Compute it with: snakemake --cores 1 <that file>")
    return json.loads(metadata[METADATA_KEY])


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
