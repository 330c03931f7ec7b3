"""Input paths checked before any work: a clear error naming the key, the path and what is wrong.

Light on purpose (no torch, no transformers): the CLI checks its config's
paths before loading anything, and the pipeline checks every local path when
Snakemake builds the DAG, dry runs included.
"""

from __future__ import annotations

from pathlib import Path

from lexalign.core.errors import LexAlignError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.safetensors.index.json",
                   "*.bin.index.json")
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")
"""A folder holds a tokenizer when it has one of these."""
TOKENIZER_FILES = (*TOKENIZER_VOCAB_FILES, "special_tokens_map.json", "added_tokens.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
"""Every file that can change how a tokenizer tokenizes (the reference step's key hashes them all)."""


def lone_adapter(path: str | Path) -> bool:
    """A PEFT adapter alone (adapter_config.json, no full model's config.json): finetune with merge: false."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model a lone adapter was trained on, as its adapter_config.json names it (a folder or a Hub id)."""
    import json

    return json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]


def missing_model_parts(path: Path, tokenizer: bool = True) -> list[str]:
    """What a folder lacks to be a model transformers can load: config, weights, tokenizer."""
    adapter = (path / "adapter_config.json").is_file()
    missing = []
    if not adapter and not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors)")
    if tokenizer and not adapter and not any((path / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        missing.append("a tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    return missing


def require_model(path: str | Path, produced_by: str, tokenizer: bool = True, key: str | None = None) -> Path:
    """The model folder at `path`, or a clear error: not there, not a folder, or missing parts (named)."""
    path = Path(path)
    where = f" ({key})" if key else ""
    fix = f"Run: {produced_by}" if produced_by.startswith(("lexalign ", "snakemake ")) else produced_by
    if not path.exists():
        raise LexAlignError(f'Model not found at "{path}"{where}', hint=fix)
    if not path.is_dir():
        raise LexAlignError(f'No model at "{path}"{where}', "It is a file; a model is a folder with config.json, "
                            "weights and a tokenizer", hint=f"Point it at the model's folder. {fix}")
    missing = missing_model_parts(path, tokenizer)
    if missing:
        found = sorted(p.name for p in path.iterdir())[:12]
        raise LexAlignError(f'No model at "{path}"{where}', f"Missing: {', '.join(missing)}",
                            f"Found: {', '.join(found) or '(an empty folder)'}",
                            hint=f"Point it at a saved model (save_pretrained's folder). {fix}")
    return path


def require_data(path: str | Path | None, key: str, fix: str = "Fix the path in the config") -> Path:
    """A dataset file or folder that exists (not an empty folder)."""
    if not path:
        raise LexAlignError(f'No dataset path: "{key}" is empty', hint=fix)
    path = Path(path).expanduser()
    if not path.exists():
        raise LexAlignError(f'Dataset not found at "{path}" ({key})', hint=fix)
    if path.is_dir() and not any(path.iterdir()):
        raise LexAlignError(f'No data at "{path}" ({key})', "The folder is empty",
                            hint="Point it at the data files (JSON Lines, JSON, CSV, Parquet) or their folder")
    return path
