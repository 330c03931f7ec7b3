"""The manifest of a download: what was asked for, the commit, and every file's size and sha256.

It lives in the download folder as `.lexalign-download.json` (a dot file, so data
loaders and folder hashes skip it). A later run that asks for the same thing
checks the files against it and fetches nothing when they all match.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lexalign.core.io import read_json, write_json
from lexalign.core.lineage import LINEAGE_FILE

MANIFEST_FILE = ".lexalign-download.json"
# Files LexAlign writes into a download folder; a repo's own files of these names are not fetched.
RESERVED = (LINEAGE_FILE, MANIFEST_FILE)
_CHUNK = 1 << 20


def digests(path: Path, git: bool = False) -> tuple[int, str, str | None]:
    """Size, sha256 and (with `git`) the git blob id of a file, in one read."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % size) if git else None
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha256.update(chunk)
            if blob is not None:
                blob.update(chunk)
    return size, sha256.hexdigest(), blob.hexdigest() if blob is not None else None


def content_files(root: Path) -> list[str]:
    """Every file under `root` (posix paths), except LexAlign's own and the Hub client's bookkeeping."""
    out = []
    for file in root.rglob("*"):
        rel = file.relative_to(root).as_posix()
        if file.is_file() and rel not in RESERVED and not rel.startswith(".cache/huggingface/"):
            out.append(rel)
    return sorted(out)


def describe(root: Path) -> dict[str, dict[str, Any]]:
    """`{path: {size, sha256}}` of the content files under `root`."""
    files = {}
    for rel in content_files(root):
        size, sha256, _ = digests(root / rel)
        files[rel] = {"size": size, "sha256": sha256}
    return files


def write(root: Path, request: dict, commit: str | None, files: dict[str, dict[str, Any]],
          revision: str | None = None) -> dict:
    data = {
        "format": 1,
        "request": request,
        "revision": revision,
        "commit": commit,
        "files": files,
        "total_size": sum(f["size"] for f in files.values()),
    }
    write_json(root / MANIFEST_FILE, data)
    return data


def read(root: Path) -> dict | None:
    file = Path(root) / MANIFEST_FILE
    try:
        data = read_json(file) if file.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def problems(root: Path, data: dict, hashes: bool = True) -> list[str]:
    """What is wrong with the files of `root` against its manifest (empty: complete and intact)."""
    found = []
    for rel, want in sorted(data["files"].items()):
        path = root / rel
        if not path.is_file():
            found.append(f"{rel}: missing")
        elif path.stat().st_size != want.get("size"):
            found.append(f"{rel}: {path.stat().st_size} bytes, expected {want.get('size')}")
    if hashes and not found:
        for rel, want in sorted(data["files"].items()):
            if digests(root / rel)[1] != want.get("sha256"):
                found.append(f"{rel}: sha256 differs from the manifest")
    return found


def complete(root: Path, request: dict, commit: str | None = None, revision: str | None = None,
             hashes: bool = True) -> dict | None:
    """The manifest of `root` if it holds exactly `request` and every file checks out.

    With `commit`: only a download of that commit counts. With `revision` (when the
    commit cannot be known, offline): only one made for that revision, or of that commit.
    """
    data = read(root)
    if data is None or data.get("request") != request:
        return None
    if commit is not None and data.get("commit") != commit:
        return None
    if revision is not None and revision not in (data.get("revision"), data.get("commit")):
        return None
    return None if problems(root, data, hashes) else data
