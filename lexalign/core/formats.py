"""The dataset formats LexAlign reads and the compressions it unpacks: the words of a config's `format` key.

Below both the config checks (`lexalign.config.sections.DatasetConfig`) and the
readers (`lexalign.data.load`, `lexalign.data.compressed`), which both name them.
"""

from __future__ import annotations

from lexalign.core.errors import LexAlignError

FORMATS = ("auto", "json", "jsonl", "csv", "tsv", "parquet", "arrow")
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}


def unsupported_format(fmt: str) -> LexAlignError:
    return LexAlignError(
        f'Unsupported dataset format "{fmt}"',
        f"Supported formats: {', '.join(FORMATS)}",
        f"JSON, JSON Lines and CSV/TSV may be compressed: {', '.join(sorted(COMPRESSIONS))}",
        hint="Unpack the archive and point the dataset's path at its folder" if fmt in ("zip", "tar", "tgz", "7z")
        else "Convert it, e.g. pandas.read_fwf(path).to_json('data.jsonl', orient='records', lines=True)",
    )
