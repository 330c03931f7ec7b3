"""Where a dataset's rows are: splits named by files or folders, shards, and a repo's sub-folder (`data_dir`).

Hub datasets name their files after the split: `train.jsonl.gz` (Anthropic
hh-rlhf), `data/train_prefs-00000-of-00001.parquet` (UltraFeedback binarized),
`data/train-00001-of-00003.parquet` (a split in shards, sometimes with a hash
after the count), or keep a folder per split (`train/part-0.jsonl`). A dataset
repo may also hold several datasets in sub-folders (`helpful-base/`,
`harmless-base/`), of which `data_dir` picks one.

Pure Python (no numpy, no pyarrow): the download step uses it too.
"""

from __future__ import annotations

import glob
import re
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath

from lexalign.core.errors import LexAlignError

_SHARD = re.compile(r"^(?P<split>.+?)-(?P<index>\d+)-of-(?P<total>\d+)(?:-[0-9a-f]{6,})?$")
_DIGITS = re.compile(r"(\d+)")
FOLDER_NOT_SPLIT = "data"  # the Hub's folder for every split's files


def stem(name: str) -> str:
    """A file name without any extension: `train` for `train.jsonl.gz`."""
    return name.split(".")[0]


def split_of(name: str) -> str:
    """The split a file name stands for: `train_prefs` for `train_prefs-00000-of-00001.parquet`."""
    found = _SHARD.match(stem(name))
    return found["split"] if found else stem(name)


def matches(path: Path, root: Path, split: str) -> bool:
    """Whether a file under `root` belongs to `split`: by its name (`train.jsonl`, `train-00000-of-00002.parquet`,
    `train-foo.csv`) or a folder it sits in (`train/part-0.jsonl`)."""
    name = stem(path.name)
    return name == split or name.startswith(f"{split}-") or split in path.relative_to(root).parts[:-1]


def splits_found(files: list[Path], root: Path) -> list[str]:
    """Every split name that selects some of `files`: from the file names, and their folders (but `data/`)."""
    names = {split_of(p.name) for p in files}
    names |= {part for p in files for part in p.relative_to(root).parts[:-1] if part != FOLDER_NOT_SPLIT}
    return sorted(names)


def file_labels(files: list[Path], root: Path) -> dict[Path, str]:
    """How rejects name each file: its name, or its path under `root` where names repeat
    (`helpful-base/train.jsonl.gz` and `harmless-base/train.jsonl.gz`)."""
    counts = Counter(f.name for f in files)
    return {f: f.relative_to(root).as_posix() if counts[f.name] > 1 and f.is_relative_to(root) and f != root
            else f.name for f in files}


def natural_key(path: Path, root: Path) -> list:
    """Sort `part-2` before `part-10` (the Hub's zero-padded shards sort the same either way)."""
    return [int(t) if i % 2 else t for i, t in enumerate(_DIGITS.split(path.relative_to(root).as_posix()))]


def check_shards(files: list[Path], root: Path, split: str) -> None:
    """Every shard `-NNNNN-of-MMMMM` of the split is there: a missing one would silently drop its rows."""
    groups: dict[tuple, set[int]] = defaultdict(set)
    for file in files:
        found = _SHARD.match(stem(file.name))
        if found:
            prefix = (file.relative_to(root).parent.as_posix(), found["split"], int(found["total"]))
            groups[prefix].add(int(found["index"]))
    for (folder, name, total), indices in groups.items():
        missing = sorted(set(range(total)) - indices)
        if missing:
            where = f"{folder}/{name}" if folder != "." else name
            raise LexAlignError(
                f'Split "{split}" in "{root}" is missing {len(missing)} of its {total} shards',
                f"{where}-*-of-{total:05d}: no shard " + ", ".join(f"{i:05d}" for i in missing[:10])
                + (" …" if len(missing) > 10 else ""),
                hint="The download is incomplete: run the download again (it fetches only what is missing)",
            )


# --- data_dir ---------------------------------------------------------------------------------------


def clean_data_dir(data_dir: str) -> str:
    """`data_dir` as a relative posix path (`helpful-base`), refused when it could leave the dataset."""
    text = str(data_dir).replace("\\", "/").strip()
    posix = PurePosixPath(text)
    if not text.strip("/.") or posix.is_absolute() or ".." in posix.parts or re.match(r"^[A-Za-z]:", text):
        raise LexAlignError(
            f'data_dir "{data_dir}" is not a sub-folder name',
            "Expected a folder inside the dataset, relative to it (no leading /, no ..)",
            hint='Use e.g. data_dir: "helpful-base", or remove data_dir to read the whole dataset',
        )
    return posix.as_posix().removeprefix("./").strip("/")


def folders_of(paths: list[str]) -> list[str]:
    """Every folder that holds one of the (posix, relative) `paths`, hidden ones left out."""
    out = set()
    for path in paths:
        parts = PurePosixPath(path).parts[:-1]
        if any(p.startswith(".") for p in parts):
            continue
        out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return sorted(out)


def missing_data_dir(data_dir: str, where: str, folders: list[str]) -> LexAlignError:
    shown = ", ".join(folders[:30]) + (f" … ({len(folders)} in all)" if len(folders) > 30 else "")
    return LexAlignError(
        f'data_dir "{data_dir}" is not a folder of {where}',
        f"Sub-folders: {shown}" if folders else "It has no sub-folders: the data files are at its top level",
        hint="Set data_dir to one of the sub-folders, or remove data_dir to read the whole dataset",
    )


def resolve_data_dir(path: str | Path, data_dir: str | None) -> Path:
    """The folder the data files are read from: `path`, or its sub-folder `data_dir`."""
    path = Path(path)
    if not data_dir:
        return path
    rel = clean_data_dir(data_dir)
    if not path.exists():
        raise LexAlignError(f'Dataset not found at "{path}"',
                            hint="Fix the dataset's path, or run: lexalign download --config …")
    if not path.is_dir():
        raise LexAlignError(f'data_dir "{data_dir}" needs a folder, but "{path}" is a file',
                            hint="Point path at the dataset's folder, or remove data_dir")
    folder = path / rel
    if not folder.is_dir():
        files = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        raise missing_data_dir(data_dir, f'"{path}"', folders_of(files))
    return folder


def data_dir_patterns(data_dir: str, allow_patterns: list[str] | str | None = None) -> list[str]:
    """Hub allow patterns that fetch only `data_dir` (and, within it, what `allow_patterns` select)."""
    base = glob.escape(clean_data_dir(data_dir))
    if allow_patterns is None:
        return [f"{base}/*"]
    allow = [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns)
    return [f"{base}/{p.lstrip('/')}" for p in allow]
