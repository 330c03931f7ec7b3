"""Compressed data files, read as a stream: `.gz`, `.bz2`, `.xz` (Python) and `.zst` (pyarrow's zstd codec).

The format of a compressed file is the extension under the compression one
(`train.jsonl.gz` is JSON Lines). `open_binary` gives a buffered binary stream
of the decompressed bytes, read a block at a time, so memory stays bounded;
a damaged or truncated file stops the read with a LexAlignError naming it.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from pathlib import Path

from lexalign.core.errors import LexAlignError
from lexalign.core.formats import COMPRESSIONS

_BUFFER = 1 << 20


def compression(path: Path) -> str | None:
    """`gzip`, `bz2`, `xz`, `zstd`, or None for a plain file (from the extension)."""
    return COMPRESSIONS.get(path.suffix.lower())


def inner_suffix(path: Path) -> str:
    """The extension that says the format: `.jsonl` for `train.jsonl.gz`, `.csv` for `data.csv`."""
    return Path(path.stem).suffix.lower() if compression(path) else path.suffix.lower()


def damaged(path: Path, err: BaseException) -> LexAlignError:
    what = compression(path) or "compressed"
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    tool = {"gzip": "gzip", "bz2": "bzip2", "xz": "xz", "zstd": "zstd"}.get(what, what)
    return LexAlignError(
        f'Could not decompress "{path}" ({what})', f"The file is damaged or incomplete: {text}",
        hint=f"Download it again (a partial download is the usual cause); test a copy with: {tool} -t {path.name}",
    )


def zstd_available() -> bool:
    """Whether this pyarrow can decompress zstd (PyPI's wheels can; a minimal build may not)."""
    import pyarrow as pa

    return pa.Codec.is_available("zstd")


class _Guarded(io.RawIOBase):
    """A decompressing stream whose errors become a LexAlignError naming the file."""

    def __init__(self, path: Path, kind: str):
        self.path = path
        try:
            if kind == "zstd":
                import pyarrow as pa

                if not zstd_available():
                    raise LexAlignError(
                        f'Cannot read "{path}": this pyarrow was built without the zstd codec',
                        hint=f"Decompress it first (zstd -d {path.name}), or install pyarrow from PyPI, "
                             "whose wheels include zstd",
                    )
                self.inner = pa.CompressedInputStream(pa.OSFile(str(path)), "zstd")
            else:
                self.inner = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[kind](path, "rb")
        except (OSError, ValueError) as err:
            raise damaged(path, err) from None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.inner.read(len(buffer))
        except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as err:
            # pyarrow's errors (ArrowInvalid, ArrowIOError) are OSError or ValueError subclasses
            raise damaged(self.path, err) from None
        size = len(data)
        memoryview(buffer).cast("B")[:size] = data
        return size

    def close(self) -> None:
        if not self.closed:
            try:
                self.inner.close()
            finally:
                super().close()


def open_binary(path: Path) -> io.BufferedIOBase:
    """The file's bytes, decompressed when its extension says so (close it, or use `with`)."""
    kind = compression(path)
    if kind is None:
        return path.open("rb")
    return io.BufferedReader(_Guarded(path, kind), buffer_size=_BUFFER)


def open_text(path: Path) -> io.TextIOBase:
    """The file as text for the CSV reader: UTF-8 (a BOM dropped), bad bytes kept as surrogate escapes."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", errors="surrogateescape", newline="")


def read_head(path: Path, size: int) -> bytes:
    """Up to `size` bytes from the start of the (decompressed) file."""
    with open_binary(path) as handle:
        return handle.read(size)


def read_all(path: Path) -> bytes:
    """The whole (decompressed) file."""
    with open_binary(path) as handle:
        return handle.read()
