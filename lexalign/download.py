"""The download step: models and datasets from the demo, a local path, or the Hub.

All three sources have one config shape (`SourceConfig`) and land in a folder
written atomically, with a `lineage.json` recording where it came from.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lexalign.config.stages import SourceConfig
from lexalign.errors import LexAlignError
from lexalign.io import atomic_dir
from lexalign.lineage import stage_record, write_lineage

# With safetensors present, these duplicate weight formats are not fetched.
DUPLICATE_WEIGHT_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.ckpt"]


def _copy_local(src: Path, dest: Path) -> None:
    if not src.exists():
        raise LexAlignError(f'Local path not found: "{src}"', hint="Fix `path` in the config, or use source: demo")
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True, symlinks=False)
    else:
        shutil.copy2(src, dest / src.name)


def _hub_error(err: Exception, source: SourceConfig) -> LexAlignError:
    from huggingface_hub import errors as hf_errors

    rid, rev = source.repo_id, source.revision
    if isinstance(err, hf_errors.GatedRepoError):
        return LexAlignError(
            f"access to {rid} is gated (revision {rev})",
            hint=f"Accept the terms at https://huggingface.co/{rid}, then log in with `hf auth login` or set HF_TOKEN",
        )
    if isinstance(err, hf_errors.RevisionNotFoundError):
        return LexAlignError(f"revision not found: {rid} (revision {rev})", hint="Check the branch, tag or commit")
    if isinstance(err, hf_errors.RepositoryNotFoundError):
        return LexAlignError(
            f"repository not found: {rid} (revision {rev})",
            hint="Check the repo id; a private repo also needs `hf auth login` or HF_TOKEN",
        )
    if isinstance(err, hf_errors.LocalEntryNotFoundError) or "connect" in str(err).lower():
        return LexAlignError(
            f"the Hugging Face Hub could not be reached while fetching {rid}",
            hint="Check the network, or download elsewhere and use source: local with a path",
        )
    return LexAlignError(f"download of {rid} (revision {rev}) failed: {type(err).__name__}")


def _fetch_hub(source: SourceConfig, dest: Path) -> dict:
    """Snapshot a Hub repo into `dest`; return the resolved commit and file list."""
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    try:
        info = api.repo_info(source.repo_id, revision=source.revision, repo_type=source.repo_type, files_metadata=False)
        files = [s.rfilename for s in (info.siblings or [])]
        ignore = list(source.ignore_patterns or []) if not isinstance(source.ignore_patterns, str) else [source.ignore_patterns]
        if source.repo_type == "model" and any(f.endswith(".safetensors") for f in files):
            ignore += DUPLICATE_WEIGHT_PATTERNS
        snapshot_download(
            source.repo_id,
            revision=info.sha,
            repo_type=source.repo_type,
            allow_patterns=source.allow_patterns,
            ignore_patterns=ignore or None,
            local_dir=dest,
        )
    except LexAlignError:
        raise
    except Exception as err:  # every Hub failure becomes a message, never a traceback
        raise _hub_error(err, source) from None
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    return {"resolved_revision": info.sha, "files": sorted(files)}


def fetch(source: SourceConfig, out_dir: str | Path, kind: str, seed: int = 42) -> Path:
    """Fetch one model or dataset into `out_dir`.

    kind: `model`, `sft_data` or `preference_data` (the demo builds each differently).
    """
    from lexalign.demo import data as demo_data

    out_dir = Path(out_dir)
    extra: dict = {}
    with atomic_dir(out_dir) as tmp:
        if source.source == "demo":
            if kind == "model":
                from lexalign.demo.model import write_demo_model

                extra["demo_model"] = write_demo_model(tmp, seed)
            else:
                extra["rows"] = demo_data.write(kind, tmp, seed)
        elif source.source == "local":
            _copy_local(Path(source.path).expanduser(), tmp)
        else:
            extra.update(_fetch_hub(source, tmp))
        record = stage_record("download", {"kind": kind, **source.to_dict()}, {}, extra)
        write_lineage(tmp, record)
    return out_dir


def download_all(config: dict, only: str | None = None, dry_run: bool = False) -> list[Path]:
    """`lexalign download`: every model and dataset listed in a downloads config."""
    done = []
    for section, kind in (("models", "model"), ("datasets", "preference_data")):
        for entry in config.get(section, []):
            source = SourceConfig.from_dict(entry)
            name = source.name or (source.repo_id or source.path or f"demo-{kind}").rstrip("/").split("/")[-1]
            if only and name != only:
                continue
            out = Path(source.output or f"results/downloads/{section}/{name}")
            if dry_run:
                print(f"would fetch {kind} {name} from {source.source} → {out}")
                continue
            print(f"Fetching {kind} {name} from {source.source} → {out}", flush=True)
            done.append(fetch(source, out, kind, seed=config.get("seed", 42)))
    return done
