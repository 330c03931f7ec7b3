"""The download step: models and datasets from the demo, a local path, or the Hub.

All three sources have one config shape (`SourceConfig`) and land in a folder
put in place atomically, with a `lineage.json` recording where it came from (for
the Hub: the commit the revision resolved to) and a `.lexalign-download.json`
manifest of every file's size and sha256. Hub downloads go through the real
`huggingface_hub` client (see `lexalign/hub/`): resumable, checked against the
Hub's checksums, and not fetched again when a complete copy is in place.

Authentication is the client's own: HF_TOKEN, or the login stored by
`hf auth login`. The token never reaches a message, a log, the lineage or any
output: configs cannot hold one (the schema has no such key).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from lexalign.config.sections import SourceConfig
from lexalign.core.errors import LexAlignError
from lexalign.core.io import atomic_dir
from lexalign.core.lineage import readme_metadata, stage_record, write_lineage
from lexalign.hub import gguf, manifest
from lexalign.hub.fetch import files_count, human_size

SECTIONS = (("models", "model"), ("datasets", "preference_data"))


def _copy_local(src: Path, dest: Path, data_dir: str | None = None) -> None:
    if not src.exists():
        raise LexAlignError(f'Local path not found: "{src}"', hint="Fix `path` in the config, or use source: demo")
    if data_dir:
        from lexalign.data.splits import resolve_data_dir

        src = resolve_data_dir(src, data_dir)
    if src.is_dir():
        root = src.resolve()
        for link in (p for p in src.rglob("*") if p.is_symlink()):
            if not link.resolve().is_relative_to(root):
                raise LexAlignError(f'"{link}" links outside "{src}" (to "{link.resolve()}")',
                                    hint="Refusing to copy it: replace the link with the file itself")
        shutil.copytree(src, dest, dirs_exist_ok=True, symlinks=False, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dest / src.name)


def _link_or_copy(src, dest) -> None:
    """A hard link where the file system allows one: a local model's weights are never copied (a 15 GB
    checkpoint lands in results/ at no cost); a copy across file systems."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _request(source: SourceConfig, kind: str, data_dir: str | None = None) -> dict:
    where = {"data_dir": data_dir} if data_dir else {}
    if source.gguf_file:
        where["gguf_file"] = source.gguf_file
    if source.source == "local":
        return {"source": "local", "path": str(Path(source.path).expanduser()), **where}
    return {"source": "demo", "kind": kind, **where}


def _finisher(source: SourceConfig, kind: str, data_dir: str | None = None):
    def finish(folder: Path, extra: dict) -> None:
        config = {"kind": kind, **source.to_dict(), **({"data_dir": data_dir} if data_dir else {})}
        license_ = readme_metadata(folder).get("license") if kind == "model" else None
        if license_:  # carried into the model cards of every model made from it
            extra = {**extra, "license": license_}
        write_lineage(folder, stage_record("download", config, {}, extra))

    return finish


def fetch(source: SourceConfig, out_dir: str | Path, kind: str, seed: int = 42, data_dir: str | None = None) -> Path:
    """Fetch one model or dataset into `out_dir`.

    kind: `model`, `sft_data` or `preference_data` (the demo builds each differently;
    for the Hub it picks the default repo_type). `data_dir` (datasets): only this
    sub-folder is fetched (from the Hub, through allow patterns) or copied, and it
    lands as `out_dir/<data_dir>`, where the data loaders look for it.
    """
    out_dir = Path(out_dir)
    if data_dir:  # datasets only: a model download never imports the data code (nor reruns when it changes)
        from lexalign.data.splits import clean_data_dir, data_dir_patterns

        data_dir = clean_data_dir(data_dir)
    finish = _finisher(source, kind, data_dir)
    if source.source == "hub":
        from lexalign.hub.fetch import fetch_hub

        if data_dir:
            source = replace(source, allow_patterns=data_dir_patterns(data_dir, source.allow_patterns))
        try:
            fetch_hub(source, out_dir, source.hub_repo_type(kind), finish, data_dir)
        except OSError as err:  # disk full, permissions: a message, not a traceback
            raise LexAlignError(f'Could not write the download of {source.repo_id} to "{out_dir}"',
                                err.strerror or type(err).__name__,
                                hint="Check free disk space and permissions; run again to resume") from None
        return out_dir
    extra: dict = {}
    with atomic_dir(out_dir) as tmp:
        target = tmp / data_dir if data_dir else tmp
        target.mkdir(parents=True, exist_ok=True)
        if source.source == "demo":
            if kind == "model":
                from lexalign.demo.model import write_demo_model

                extra["demo_model"] = write_demo_model(tmp, seed)
            else:
                from lexalign.demo import datasets

                extra["rows"] = datasets.write(kind, target, seed)
        elif source.source == "local" and kind == "model" and gguf.is_gguf(source.path, source.gguf_file):
            # A GGUF file becomes an ordinary model folder: the weights dequantized, the tokenizer from its metadata
            extra["gguf"] = gguf.convert_gguf(source.path, tmp, source.gguf_file)
            if extra["gguf"].get("license"):  # carried into the model cards, as a README's license is
                extra["license"] = extra["gguf"]["license"]
        elif source.source == "local" and source.gguf_file:
            raise LexAlignError(f"gguf_file ({source.gguf_file}) is for a model, not for {kind}",
                                hint="Remove gguf_file: a dataset's files are copied as they are")
        elif source.source == "local":
            _copy_local(Path(source.path).expanduser(), target, data_dir)
        else:
            raise LexAlignError(f'Unknown source "{source.source}"', hint="Use demo, local or hub")
        manifest.write(tmp, _request(source, kind, data_dir), None, manifest.describe(tmp))
        finish(tmp, extra)
    return out_dir


# --- lexalign download -----------------------------------------------------------------------


def _entries(config: dict, only: str | None) -> list[tuple[str, str, str, SourceConfig, Path]]:
    """(section, kind, name, source, output) of every entry of a downloads config."""
    entries, names = [], []
    for section, kind in SECTIONS:
        for entry in config.get(section) or []:
            source = SourceConfig.from_dict(entry)
            name = source.name or (source.repo_id or source.path or f"demo-{kind}").rstrip("/").split("/")[-1]
            names.append(name)
            if only and name != only:
                continue
            entries.append((section, kind, name, source, Path(source.output or f"results/downloads/{section}/{name}")))
    if only and not entries:
        raise LexAlignError(f'No model or dataset named "{only}" in the config',
                            f"Names: {', '.join(names) or '(none)'}",
                            hint="Use one of these names, or set `name:` on the entry")
    return entries


def _describe_source(source: SourceConfig, kind: str) -> str:
    if source.source == "hub":
        return f"hub {source.repo_id} ({source.hub_repo_type(kind)}, revision {source.revision})"
    if source.source == "local":
        return f"local {source.path}"
    return "demo"


def _dry_run_entry(source: SourceConfig, kind: str, out: Path) -> tuple[int, int]:
    """Print what would be fetched; return (files, bytes)."""
    if source.source == "demo":
        print("  built offline by LexAlign (no files to fetch)")
        return 0, 0
    if source.source == "local" and kind == "model" and gguf.is_gguf(source.path, source.gguf_file):
        file = gguf.gguf_path(source.path, source.gguf_file, "path")
        return _print_files([(file.name, file.stat().st_size)], "1 GGUF file, {size}, to convert into a model folder")
    if source.source == "local":
        src = Path(source.path).expanduser()
        if not src.exists():
            raise LexAlignError(f'Local path not found: "{src}"', hint="Fix `path` in the config")
        files = [(src.name, src.stat().st_size)] if src.is_file() else \
            [(p.relative_to(src).as_posix(), p.stat().st_size) for p in sorted(src.rglob("*")) if p.is_file()]
        return _print_files(files, f"{files_count(len(files))}, {{size}} to copy")
    from lexalign.hub.failures import hub_error, is_offline, offline_error
    from lexalign.hub.fetch import make_plan, request_of

    repo_type = source.hub_repo_type(kind)
    if is_offline():
        raise offline_error(source.repo_id, source.revision)
    try:
        plan = make_plan(source, repo_type)
    except LexAlignError:
        raise
    except Exception as err:
        raise hub_error(err, source.repo_id, source.revision, repo_type) from None
    print(f"  commit {plan.commit}")
    total = _print_files([(f.path, f.size) for f in plan.files], f"{files_count(len(plan.files))}, {{size}}")
    if plan.skipped:
        print(f"  skipped, duplicate weights (safetensors present): {', '.join(f.path for f in plan.skipped)}")
    present = manifest.complete(out, request_of(source, repo_type), commit=plan.commit, hashes=False)
    print(f"  already complete in {out}: nothing to download" if present else "  would download them")
    return total


def _print_files(files: list[tuple[str, int]], summary: str) -> tuple[int, int]:
    width = max((len(p) for p, _ in files), default=0)
    for path, size in files:
        print(f"    {path:<{width}}  {human_size(size):>9}")
    total = sum(size for _, size in files)
    print("  " + summary.format(size=human_size(total)))
    return len(files), total


def download_all(config: dict, only: str | None = None, dry_run: bool = False) -> list[Path]:
    """`lexalign download`: every model and dataset listed in a downloads config.

    With `dry_run`, list each entry's files and sizes (the Hub is asked for its
    file list, nothing is downloaded) and the total.
    """
    done: list[Path] = []
    count = size = 0
    for _section, kind, name, source, out in _entries(config, only):
        label = "model" if kind == "model" else "dataset"
        if dry_run:
            print(f"{label} {name}: {_describe_source(source, kind)} → {out}", flush=True)
            n, b = _dry_run_entry(source, kind, out)
            count, size = count + n, size + b
            continue
        print(f"Fetching {label} {name} from {_describe_source(source, kind)} → {out}", flush=True)
        done.append(fetch(source, out, kind, seed=config.get("seed", 42)))
    if dry_run:
        print(f"Total: {files_count(count)}, {human_size(size)} (dry run: nothing was downloaded)", flush=True)
    return done
