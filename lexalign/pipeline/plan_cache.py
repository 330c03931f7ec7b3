"""What reading the workflow derives from the config and the package, kept between Snakemake runs.

Snakemake reads the workflow on every run, every dry run and every cluster job. Each time, the workflow checks
the config against its schema (importing jsonschema alone costs about 0.05 s) and derives every step's code
inputs from the package's imports (lexalign.pipeline.code_inputs). Both are functions of two things only: the config as
given and the package's files. So their results are kept in the working directory's `.snakemake/lexalign/`,
each under a key made of its inputs and the content of every package file (about 85 files, hashed in a few
milliseconds): an edit anywhere in the package, or in the config, misses and recomputes. Nothing that depends on
other files is kept (the config's local paths are checked on every run), what the computation printed (its
warnings) is printed again on every hit, and a failure is never kept. A working directory that cannot be written
recomputes every time.

Standard library only: the Snakefile imports this module as Snakemake parses it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(".snakemake") / "lexalign"
"""Beside Snakemake's own records of the working directory (relative: Snakemake parses in the working directory)."""
PACKAGE_SUFFIXES = (".py", ".yaml", ".json")
"""The package files a derivation can read: modules, the config schemas, the demo's tasks."""


@functools.cache
def package_digest(root: Path = PACKAGE_DIR) -> str:
    """A hash of the content and name of every package file (bytecode caches and the bundled workflow aside)."""
    digest = hashlib.sha256()
    for directory, subdirectories, files in sorted(os.walk(root)):
        subdirectories[:] = sorted(d for d in subdirectories if d not in ("__pycache__", "_workflow"))
        for name in sorted(files):
            if name.endswith(PACKAGE_SUFFIXES):
                path = Path(directory, name)
                digest.update(str(path.relative_to(root)).encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def remembered(name: str, inputs: Any, compute: Callable[[], Any], directory: Path = CACHE_DIR) -> Any:
    """compute()'s value (plain JSON data), read from `directory/name.json` when it was kept for the same
    `inputs` and the same package; else computed, kept, and returned. What compute() printed on stderr is
    printed on every call, as if it had run."""
    key = hashlib.sha256(json.dumps([package_digest(), inputs], sort_keys=True, default=repr).encode()).hexdigest()
    path = directory / f"{name}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept["key"] == key:
            sys.stderr.write(kept["said"])
            return kept["value"]
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            value = compute()
    finally:
        sys.stderr.write(said.getvalue())
    text = json.dumps({"key": key, "said": said.getvalue(), "value": value}, default=repr)
    if json.loads(text)["value"] == value:  # only what reads back as it was (no tuples, dates or objects)
        with contextlib.suppress(OSError):
            _write_atomically(path, text)
    return value


def _write_atomically(path: Path, text: str) -> None:
    """Several Snakemake processes (cluster jobs) may write the same entry at once: each renames a whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
