"""Atomic outputs, content hashes and JSON helpers.

Every output is written under a temporary name beside its final place and
renamed into place only when complete, so a killed step never leaves a file or
folder that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from lexalign.core.errors import LexAlignError


def _tmp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete `.name.tmp-PID` / `.name.old-PID` left beside `path` by killed processes."""
    for leftover in path.parent.glob(f".{path.name}.*-*"):
        kind, _, pid = leftover.name[len(path.name) + 2:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _tmp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise LexAlignError(f'No space left on the device while writing "{path}"',
                                "The previous output, if any, is untouched.",
                                hint="Free some disk space (or point results/ elsewhere) and run again") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary name and fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise LexAlignError(f'Could not write "{path}": {err.strerror}',
                            "The previous version, if any, is untouched.",
                            hint="Check free disk space and permissions") from None
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def safe_relative_path(name: str, where: str) -> str:
    """A file name from a repo or dataset, refused if it could land outside its folder."""
    from pathlib import PurePosixPath, PureWindowsPath

    posix = PurePosixPath(name.replace("\\", "/"))
    if not name or posix.is_absolute() or PureWindowsPath(name).drive or ".." in posix.parts:
        raise LexAlignError(f'Unsafe file name "{name}" in {where}',
                            "Absolute paths and `..` could write outside the output folder",
                            hint="Refusing to fetch it: check the repo or dataset")
    return posix.as_posix()


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    with Path(path).open(encoding="utf-8") as handle:
        return json.load(handle)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest(path: str | Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under `path` (or of `path` itself)."""
    path = Path(path)
    if path.is_file():
        return {path.name: {"size": path.stat().st_size, "sha256": sha256_file(path)}}
    out = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        out[rel] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
    return out


def hash_path(path: str | Path) -> str:
    """One sha256 over a file or a folder's manifest, for lineage and cache keys."""
    return hashlib.sha256(json.dumps(manifest(path), sort_keys=True).encode()).hexdigest()


def hash_object(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
