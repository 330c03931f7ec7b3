"""Plan and fetch a Hub source with the real `huggingface_hub` client.

1. `make_plan`: `repo_info` resolves the revision (branch, tag or commit) to a
   commit; `list_repo_tree` lists that commit's files with their sizes and
   checksums; allow/ignore patterns and the duplicate-weights rule select from
   them (with `filter_repo_objects`, the function `snapshot_download` uses, so
   the plan and the download agree).
2. `fetch_hub`: a complete, intact download of the same request and commit
   already in place is kept. Otherwise `snapshot_download` fetches the commit
   into a staging folder beside the output (`.<name>.partial`): the client
   resumes a transfer that breaks off (HTTP Range), and a run that fails keeps
   the files it completed, so the next run fetches only the rest. Each file is
   then checked against the Hub's checksum (sha256 for LFS files, the git blob
   id for others), the manifest and lineage are written, and the staging folder
   replaces the output in one rename.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lexalign.core.errors import LexAlignError, warn
from lexalign.core.io import safe_relative_path
from lexalign.hub import manifest
from lexalign.hub.failures import endpoint, hub_error, is_network_error, is_offline, offline_error

# With safetensors weights selected, these other weight formats (PyTorch pickles,
# TensorFlow, Flax, Rust) are duplicates of the same tensors and are not fetched.
DUPLICATE_WEIGHT_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.ckpt", "*.ot"]
HUB_STATE = (".cache", "huggingface")  # the client's bookkeeping inside a local_dir


def _pattern_list(value) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def is_commit(revision: str) -> bool:
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


@dataclass
class HubFile:
    path: str
    size: int
    sha256: str | None
    """sha256 of an LFS file (the Hub's `lfs.oid`); None for a regular git file."""
    blob_id: str | None
    """The git blob id (sha1 of `blob <size>\\0<content>`)."""


@dataclass
class Plan:
    repo_id: str
    repo_type: str
    revision: str
    commit: str
    files: list[HubFile]
    skipped: list[HubFile] = field(default_factory=list)
    """Duplicate weight files left out because safetensors weights are selected."""
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None
    """The effective ignore list: the config's, LexAlign's own file names, and the duplicates rule."""

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def request_of(source, repo_type: str) -> dict:
    """What a Hub source asks for, the revision aside: equal requests at the same commit are the same download."""
    return {
        "source": "hub",
        "repo_id": source.repo_id,
        "repo_type": repo_type,
        "allow_patterns": _pattern_list(source.allow_patterns),
        "ignore_patterns": _pattern_list(source.ignore_patterns),
        "skip_duplicate_weights": source.skip_duplicate_weights,
    }


def make_plan(source, repo_type: str, data_dir: str | None = None) -> Plan:
    """Resolve the revision and select the files. Raises the client's exceptions unchanged.

    `data_dir`: the sub-folder of a dataset the allow patterns select; when the repo has no such
    folder the error says so and lists the folders it has.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi()
    info = api.repo_info(source.repo_id, repo_type=repo_type, revision=source.revision)
    commit = info.sha
    if not commit:
        raise LexAlignError(f"the Hub at {endpoint()} did not say which commit {source.revision} is",
                            hint="Check HF_ENDPOINT: it should point at the Hugging Face Hub or a mirror of it")
    entries = {
        e.path: HubFile(e.path, e.size, e.lfs.sha256 if e.lfs else None, e.blob_id)
        for e in api.list_repo_tree(source.repo_id, repo_type=repo_type, revision=commit, recursive=True)
        if isinstance(e, RepoFile)
    }
    for name in entries:  # a hostile repo must not write outside its folder
        safe_relative_path(name, f"{source.repo_id} (revision {source.revision})")
    if data_dir and not any(name.startswith(f"{data_dir}/") for name in entries):
        from lexalign.data.splits import folders_of, missing_data_dir

        raise missing_data_dir(data_dir, f"{source.repo_id} (revision {source.revision})", folders_of(list(entries)))
    allow = _pattern_list(source.allow_patterns)
    ignore = (_pattern_list(source.ignore_patterns) or []) + list(manifest.RESERVED)

    def select(ignore_patterns: list[str]) -> list[str]:
        return sorted(filter_repo_objects(entries, allow_patterns=allow, ignore_patterns=ignore_patterns))

    chosen = select(ignore)
    skipped: list[str] = []
    if source.skip_duplicate_weights and repo_type == "model" and any(p.endswith(".safetensors") for p in chosen):
        ignore += DUPLICATE_WEIGHT_PATTERNS
        kept = select(ignore)
        skipped, chosen = sorted(set(chosen) - set(kept)), kept
    if not chosen:
        raise LexAlignError(
            f"no file of {source.repo_id} (revision {source.revision}) matches the config",
            f"allow_patterns: {allow}; ignore_patterns: {_pattern_list(source.ignore_patterns)}",
            f"The repo has {len(entries)} files" + (": " + ", ".join(sorted(entries)[:10]) if entries else "."),
            hint="Fix allow_patterns / ignore_patterns",
        )
    return Plan(source.repo_id, repo_type, source.revision, commit, [entries[p] for p in chosen],
                [entries[p] for p in skipped], allow, ignore)


def staging_dir(out_dir: Path) -> Path:
    """Where a download is assembled; kept when a run fails, so the next one resumes."""
    return out_dir.parent / f".{out_dir.name}.partial"


def _all_files(root: Path) -> list[str]:
    state = "/".join(HUB_STATE) + "/"
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).as_posix().startswith(state)
    )


def _seed(staging: Path, out_dir: Path, plan: Plan) -> None:
    """Hard-link the files of an earlier download, so the client re-fetches only what changed.

    The client replaces a changed file by a new one (never writes into it), so the
    earlier download stays intact. Where links are not possible nothing is seeded.
    """
    wanted = {f.path for f in plan.files}
    for rel in _all_files(out_dir) if out_dir.is_dir() else []:
        if rel in wanted and not (staging / rel).exists():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(out_dir / rel, staging / rel)
            except OSError:
                return


def _forget(staging: Path, rel: str) -> None:
    """Remove a file and the client's note that it is complete."""
    (staging / rel).unlink(missing_ok=True)
    (staging.joinpath(*HUB_STATE) / "download" / f"{rel}.metadata").unlink(missing_ok=True)


def _verify(staging: Path, plan: Plan) -> dict[str, dict]:
    """Check every file against the Hub's checksum; return the manifest's file table."""
    files, bad = {}, []
    for f in plan.files:
        path = staging / f.path
        if not path.is_file():
            bad.append(f"{f.path}: missing")
            continue
        size, sha256, blob = manifest.digests(path, git=f.sha256 is None)
        if size != f.size:
            bad.append(f"{f.path}: {size} bytes, the Hub says {f.size}")
        elif f.sha256 is not None and sha256 != f.sha256:
            bad.append(f"{f.path}: sha256 differs from the Hub's")
        elif f.sha256 is None and f.blob_id and blob != f.blob_id:
            bad.append(f"{f.path}: git blob id differs from the Hub's")
        else:
            files[f.path] = {"size": size, "sha256": sha256}
            continue
        _forget(staging, f.path)
    if bad:
        raise LexAlignError(
            f"{len(bad)} downloaded file(s) of {plan.repo_id} (commit {plan.commit}) failed the checksum check",
            *bad[:10],
            hint="Run the same command again: the bad files were removed and will be fetched anew",
        )
    return files


def _prune(staging: Path, plan: Plan) -> None:
    """Remove files a previous request left in the staging folder."""
    wanted = {f.path for f in plan.files}
    for rel in _all_files(staging):
        if rel not in wanted:
            (staging / rel).unlink()
    for folder in sorted((p for p in staging.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def _promote(staging: Path, out_dir: Path) -> None:
    shutil.rmtree(staging.joinpath(*HUB_STATE), ignore_errors=True)
    cache = staging / HUB_STATE[0]
    if cache.is_dir() and not any(cache.iterdir()):
        cache.rmdir()
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def download(plan: Plan, staging: Path) -> None:
    """`snapshot_download` of the planned commit and files into `staging` (progress bars on stderr)."""
    from huggingface_hub import snapshot_download

    staging.mkdir(parents=True, exist_ok=True)
    snapshot_download(
        plan.repo_id,
        repo_type=plan.repo_type,
        revision=plan.commit,
        local_dir=staging,
        allow_patterns=plan.allow_patterns,
        ignore_patterns=plan.ignore_patterns,
    )


def lineage_extra(plan: Plan) -> dict:
    extra = {
        "resolved_revision": plan.commit,
        "repo_type": plan.repo_type,
        "files": [f.path for f in plan.files],
        "total_size": plan.total_size,
        "skipped_duplicate_weights": [f.path for f in plan.skipped],
    }
    if endpoint() != "https://huggingface.co":
        extra["hub_endpoint"] = endpoint()
    return extra


def _hub_unavailable(err: Exception) -> bool:
    """No network, or the Hub is down (5xx, rate limit): a complete copy in place can be kept."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    return is_network_error(err) or (status is not None and (status >= 500 or status == 429))


def fetch_hub(source, out_dir: Path, repo_type: str, finish: Callable[[Path, dict], None],
              data_dir: str | None = None) -> str:
    """Bring `out_dir` to the requested files; return `fetched`, `up to date` or `kept (offline)`.

    `finish(folder, extra)` writes the lineage into the folder before it is put in place;
    `data_dir`: see `make_plan`.
    """
    request = request_of(source, repo_type)
    rid, rev = source.repo_id, source.revision
    if is_offline():
        data = manifest.complete(out_dir, request, revision=rev)
        if data is None:
            raise offline_error(rid, rev)
        print(f"  HF_HUB_OFFLINE is set: keeping the complete download in {out_dir} (commit {data['commit']})",
              flush=True)
        return "kept (offline)"
    if is_commit(rev) and manifest.complete(out_dir, request, commit=rev):
        print(f"  up to date: {out_dir} holds commit {rev}", flush=True)
        return "up to date"
    try:
        plan = make_plan(source, repo_type, data_dir)
    except LexAlignError:
        raise
    except Exception as err:
        if _hub_unavailable(err) and (data := manifest.complete(out_dir, request, revision=rev)):
            status = getattr(getattr(err, "response", None), "status_code", None)
            why = f"it answered {status}" if status else "it could not be reached"
            warn(f"could not check {rid} (revision {rev}) on the Hub at {endpoint()}: {why}",
                 f"Keeping the complete download in {out_dir} (commit {data['commit']}).")
            return "kept (offline)"
        raise hub_error(err, rid, rev, repo_type) from None
    if manifest.complete(out_dir, request, commit=plan.commit):
        print(f"  up to date: {out_dir} holds commit {plan.commit}", flush=True)
        return "up to date"
    staging = staging_dir(out_dir)
    staging.mkdir(parents=True, exist_ok=True)
    _seed(staging, out_dir, plan)
    print(f"  commit {plan.commit}: {files_count(len(plan.files))}, {human_size(plan.total_size)}", flush=True)
    try:
        download(plan, staging)
    except Exception as err:
        if is_network_error(err) and not is_offline():
            raise LexAlignError(
                f"the connection to the Hub at {endpoint()} broke off while downloading {rid} (revision {rev})",
                hint="Run the same command again: the files already complete are kept and only the rest is fetched",
            ) from None
        raise hub_error(err, rid, rev, repo_type) from None
    _prune(staging, plan)
    files = _verify(staging, plan)
    manifest.write(staging, request, plan.commit, files, revision=rev)
    finish(staging, lineage_extra(plan))
    _promote(staging, out_dir)
    return "fetched"


def files_count(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
