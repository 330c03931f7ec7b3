"""A GGUF file as a model source: checked from its header, then converted into an ordinary model folder.

GGUF (llama.cpp's one-file format: the metadata, the tokenizer, the chat template and the quantized tensors
together) is how many models are shared for running them locally. LexAlign trains with transformers, which
reads a GGUF only slowly (every load parses the whole vocabulary and dequantizes every tensor) and will not save
what it loaded as it stands. So the download step converts the file once (`convert_gguf`): the weights
dequantized to float32 safetensors (exactly the values transformers' own GGUF load gives), config.json and
generation_config.json, the tokenizer and chat template from the GGUF's metadata. Every later step reads an
ordinary folder; lineage.json keeps the file's sha256 and quantization type.

A file transformers cannot read, cut short or without a tokenizer stops the pipeline when it is planned
(`check_gguf_source`, from lexalign.pipeline.plan), not after the steps before it ran. That check runs on every
plan, dry runs included, so it reads the header, the metadata and the tensor table with a parser of its own
(standard library only, a few milliseconds for a 100 MB file) and never the tensor data: the `gguf` package's
GGUFReader takes seconds over a large vocabulary and fails on a truncated file with numpy's errors, while the
header says where the last tensor ends, which the file's size can be held to. torch and transformers are
imported inside the functions that load.

In the hub layer because the download step's `lexalign.hub.sources.fetch` calls it: where a model comes from.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from lexalign.core.errors import LexAlignError

SUFFIX = ".gguf"
"""A local `path` ending in this is a GGUF file (any case); in a folder, `gguf_file` names it."""

GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
"""ggml's tensor types: id → (name, elements per block, bytes per block), as the `gguf` package has them
(`GGMLQuantizationType`, `GGML_QUANT_SIZES`; tests/test_gguf.py holds the two together). Here, not imported:
importing `gguf` imports numpy, a fifth of a second on every plan."""

FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S",
    27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
}
"""`general.file_type` (llama.cpp's llama_ftype, the `gguf` package's `LlamaFileType` less `MOSTLY_`): the name a
file's quantization goes by (Q4_K_M), which its tensors' types alone do not tell."""
GUESSED_FILE_TYPE = 1024
"""The flag llama.cpp adds to `general.file_type` when it guessed the type from the tensors."""

NOT_CAUSAL = {"t5", "t5encoder", "umt5"}
"""Architectures transformers reads from GGUF that are no causal language model: nothing LexAlign can train."""
RENAMED = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
"""GGUF's spelling of an architecture → transformers' (its loader renames these before looking them up)."""

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_LARGE_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                 "tokenizer.ggml.token_type", "tokenizer.ggml.precompiled_charsmap"}
"""Stepped over, never read: the vocabulary alone is 100 000 strings in a recent model (their count is kept)."""


@dataclass
class GgufHeader:
    """What a GGUF's header, metadata and tensor table say: enough to refuse a file and to record it."""

    path: Path
    file_size: int
    architecture: str | None
    name: str | None
    quantization: str | None
    """`general.file_type`'s name (Q4_1, Q4_K_M), else the type of most of the 2-D weights' bytes."""
    tensor_types: dict[str, int]
    """ggml type → how many tensors have it ({"Q4_1": 210, "F32": 61, "Q8_0": 1})."""
    tokenizer_model: str | None
    """`tokenizer.ggml.model`: gpt2 (byte-level BPE), llama (SentencePiece), t5, …; None without a tokenizer."""
    tokens: int
    """The vocabulary's size in the tokenizer metadata (0 without one)."""
    chat_template: str | None
    license: str | None
    expected_size: int
    """Where the last tensor's data ends: a complete file is at least this long."""
    metadata: dict[str, Any] = field(repr=False, default_factory=dict)
    """Every metadata key, the large tokenizer arrays as their lengths."""

    @property
    def has_tokenizer(self) -> bool:
        return bool(self.tokenizer_model) and self.tokens > 0


def is_gguf(path: str | os.PathLike | None, gguf_file: str | None = None) -> bool:
    """A local source that names a GGUF: a `path` ending in .gguf, or a `gguf_file` in the folder `path`."""
    return bool(gguf_file) or str(path or "").lower().endswith(SUFFIX)


def gguf_path(path: str | os.PathLike, gguf_file: str | None = None, key: str = "model.path") -> Path:
    """The GGUF file a local source names, or an error saying which key names what is missing."""
    path = Path(path).expanduser()
    file_key = f"{key.rsplit('.', 1)[0]}.gguf_file" if "." in key else "gguf_file"
    if gguf_file:
        if not path.is_dir():
            what = "does not exist" if not path.exists() else "is a file, not a folder"
            raise LexAlignError(f'No folder at "{path}" ({key}): it {what}',
                                f"{file_key} ({gguf_file}) names a GGUF file inside the folder {key}",
                                hint=f"Set {key} to the folder that holds {gguf_file}, or set {key} to the .gguf "
                                     f"file itself and remove {file_key}")
        file = path / gguf_file
        if not file.is_file():
            found = sorted(p.name for p in path.iterdir() if p.name.lower().endswith(SUFFIX))
            raise LexAlignError(f'GGUF file not found: "{file}" ({file_key})',
                                f"GGUF files in {path}: {', '.join(found[:12]) or '(none)'}",
                                hint=f"Fix {file_key} (a file name inside {key})")
        return file
    if not path.exists():
        from lexalign.hub.assets import SMOLLM2_GGUF

        fix = f"Fix {key}: the .gguf file (llama.cpp's format), or a model folder"
        if path.name == SMOLLM2_GGUF:  # the file `lexalign fetch smollm2` writes (the smollm2 example reads it)
            fix = f"Run: lexalign fetch smollm2 --into {path.parent} (it writes {path.name}), or f{fix[1:]}"
        raise LexAlignError(f'GGUF file not found: "{path}" ({key})', hint=fix)
    if not path.is_file():
        raise LexAlignError(f'"{path}" ({key}) is a folder, not a GGUF file',
                            hint=f"Set {key} to the .gguf file, or keep the folder and name the file in {file_key}")
    return path


def read_header(path: str | os.PathLike) -> GgufHeader:
    """The header of the GGUF file at `path`, read without its tensor data; an error naming the file when it is
    no GGUF, is of an unknown version, or is cut short (inside the metadata, or before its last tensor ends)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        magic = handle.read(4)
        if magic != b"GGUF"[:len(magic)]:  # shorter than 4 bytes but so far GGUF's magic: cut short, below
            raise LexAlignError(f'"{path}" is not a GGUF file', f"It starts with {magic!r}, not b'GGUF'",
                                hint="Point the path at a .gguf file (llama.cpp's format), or at a model folder")
        if size < 24:
            raise _truncated(path, f"It is {size} bytes long, shorter than a GGUF header (24 bytes)")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            version, tensor_count, kv_count = struct.unpack_from("<IQQ", data, 4)
            if version not in (2, 3):
                raise LexAlignError(f'"{path}" is a GGUF file of version {version}, which LexAlign cannot read',
                                    "GGUF versions 2 and 3 are read (llama.cpp has written version 3 since 2023)",
                                    hint="Convert the model again with a current llama.cpp")
            reader = _Reader(data, size, path)
            try:
                metadata = {}
                for _ in range(kv_count):
                    key = reader.string()
                    metadata[key] = reader.value(reader.unpack("<I"), key)
                tensors = [reader.tensor_info() for _ in range(tensor_count)]
            except _Short as short:
                raise _truncated(path, f"It ends at byte {size}, inside its metadata (byte {short.needed} is "
                                       "needed)") from None
            table_end = reader.pos
    alignment = int(metadata.get("general.alignment") or 32)
    data_start = -(-table_end // alignment) * alignment
    end, types, weight_bytes = data_start, {}, {}
    for name, dims, type_id, offset in tensors:
        type_name, block, block_bytes = _ggml_type(type_id, path, name)
        nbytes = prod(dims) // block * block_bytes
        end = max(end, data_start + offset + nbytes)
        types[type_name] = types.get(type_name, 0) + 1
        if len(dims) >= 2:
            weight_bytes[type_name] = weight_bytes.get(type_name, 0) + nbytes
    if size < end:
        raise _truncated(path, f"Its tensor data needs {end} bytes; the file has {size} ({size / end:.1%})")
    file_type = metadata.get("general.file_type")
    if file_type is not None:
        quantization = FILE_TYPES.get(int(file_type) & ~GUESSED_FILE_TYPE, f"file type {file_type}")
    else:  # older converters wrote no file type: the type most of the weights' bytes have
        quantization = max(weight_bytes, key=weight_bytes.get) if weight_bytes else None
    return GgufHeader(path=path, file_size=size, architecture=metadata.get("general.architecture"),
                      name=metadata.get("general.name"), quantization=quantization, tensor_types=types,
                      tokenizer_model=metadata.get("tokenizer.ggml.model"),
                      tokens=int(metadata.get("tokenizer.ggml.tokens") or 0),
                      chat_template=metadata.get("tokenizer.chat_template"), license=metadata.get("general.license"),
                      expected_size=end, metadata=metadata)


def _truncated(path: Path, detail: str) -> LexAlignError:
    return LexAlignError(f'The GGUF file "{path}" is incomplete (cut short)', detail,
                         hint="Download it again: an interrupted download or copy leaves a partial file")


def _ggml_type(type_id: int, path: Path, tensor: str) -> tuple[str, int, int]:
    """A tensor type's (name, elements per block, bytes per block); a type newer than GGML_TYPES from `gguf`."""
    if type_id in GGML_TYPES:
        return GGML_TYPES[type_id]
    try:
        import gguf

        kind = gguf.GGMLQuantizationType(type_id)
        return (kind.name, *gguf.GGML_QUANT_SIZES[kind])
    except (ImportError, ValueError, KeyError):
        raise LexAlignError(f'The GGUF file "{path}" holds a tensor of an unknown type ({type_id}): {tensor}',
                            "Neither LexAlign nor the installed gguf package knows the type",
                            hint="Upgrade gguf (pip install -U gguf), or use a file of another quantization") from None


class _Short(Exception):
    """The file ends before the byte `needed`."""

    def __init__(self, needed: int):
        self.needed = needed


class _Reader:
    """A cursor over the mapped file; every read checks the file is long enough first."""

    def __init__(self, data: mmap.mmap, size: int, path: Path):
        self.data, self.size, self.path, self.pos = data, size, path, 24

    def need(self, n: int) -> None:
        if self.pos + n > self.size:
            raise _Short(self.pos + n)

    def unpack(self, fmt: str):
        width = struct.calcsize(fmt)
        self.need(width)
        value = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += width
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        length = self.unpack("<Q")
        self.need(length)
        start, self.pos = self.pos, self.pos + length
        return self.data[start:self.pos].decode("utf-8", errors="replace")

    def value(self, kind: int, key: str):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise self.corrupt(key, f"a value of unknown type {kind}")
        item, count = self.unpack("<I"), self.unpack("<Q")
        keep = key not in _LARGE_ARRAYS
        if item in _SCALARS:
            width = struct.calcsize(_SCALARS[item])
            self.need(width * count)
            values = list(struct.unpack_from(f"<{count}{_SCALARS[item][1]}", self.data, self.pos)) if keep else count
            self.pos += width * count
            return values
        if item == _STRING and keep:
            return [self.string() for _ in range(count)]
        if item == _STRING:  # stepped over in a tight loop: the vocabulary's 100 000 lengths take milliseconds
            pos, data, size, length = self.pos, self.data, self.size, struct.Struct("<Q").unpack_from
            for _ in range(count):
                if pos + 8 > size:
                    raise _Short(pos + 8)
                pos += 8 + length(data, pos)[0]
            if pos > size:
                raise _Short(pos)
            self.pos = pos
            return count
        raise self.corrupt(key, f"an array of unknown type {item}")

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string()
        dims = tuple(self.unpack("<Q") for _ in range(self.unpack("<I")))
        return name, dims, self.unpack("<I"), self.unpack("<Q")

    def corrupt(self, key: str, what: str) -> LexAlignError:
        return LexAlignError(f'The GGUF file "{self.path}" is damaged: its metadata "{key}" holds {what}',
                             hint="Download it again, or convert the model again with a current llama.cpp")


def transformers_support() -> dict[str, list[str]] | None:
    """What the installed transformers reads from GGUF: `architectures` (GGUF's spellings, as causal language
    models) and `tokenizers` (`tokenizer.ggml.model` values); None where transformers cannot be imported (the
    download step says so then). About a second to import (no torch): planning keeps it (lexalign.pipeline.plan)."""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_TYPES
    except ImportError:
        return None
    # GGUF_CONFIG_MAPPING's keys are transformers' legacy GGUF architectures (and two of its sections, "general"
    # and "tokenizer"); GGUF_CONFIG_ARCHS the ones of its newer loader.
    names = (set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}) | set(GGUF_CONFIG_ARCHS)
    names |= {spelling for spelling, name in RENAMED.items() if name in names}
    return {"architectures": sorted(names - NOT_CAUSAL), "tokenizers": sorted(GGUF_TOKENIZER_TYPES)}


def check_gguf_source(path: str | os.PathLike, gguf_file: str | None = None, key: str = "model.path",
                      support: dict[str, list[str]] | None = None) -> GgufHeader:
    """The header of the GGUF file a local source names, or an error naming the file and what is wrong: not
    there, not a GGUF, cut short, an architecture transformers cannot read as a causal language model, no
    tokenizer (or one transformers cannot build). `support`: transformers_support() (read here when not given).
    Cheap: the tensor data is never read."""
    header = read_header(gguf_path(path, gguf_file, key))
    support = support or transformers_support()
    file, arch = header.path, header.architecture
    if not arch:
        raise LexAlignError(f'The GGUF file "{file}" names no architecture (general.architecture)',
                            hint="Convert the model again with a current llama.cpp")
    if support and arch not in support["architectures"]:
        reason = ("an encoder-decoder model, not a causal language model LexAlign can train" if arch in NOT_CAUSAL
                  else "an architecture transformers cannot read from GGUF")
        raise LexAlignError(f'The GGUF file "{file}" holds a "{arch}" model: {reason}',
                            f"transformers reads GGUF files of: {', '.join(support['architectures'])}",
                            hint="Use the model's Hugging Face folder (safetensors) instead, or a GGUF of one of these")
    if not header.has_tokenizer:
        raise LexAlignError(f'The GGUF file "{file}" has no tokenizer',
                            "Its metadata holds no tokenizer.ggml.model and tokenizer.ggml.tokens: the model alone",
                            hint="Use a GGUF written with its tokenizer (llama.cpp's converter writes it), or the "
                                 "model's Hugging Face folder")
    if support and header.tokenizer_model not in support["tokenizers"]:
        raise LexAlignError(f'The GGUF file "{file}" has a "{header.tokenizer_model}" tokenizer, which transformers '
                            "cannot build from GGUF", f"It builds: {', '.join(support['tokenizers'])}",
                            hint="Use the model's Hugging Face folder (safetensors) instead")
    return header


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, gguf_file: str | None = None,
                 key: str = "model.path") -> dict[str, Any]:
    """Convert the GGUF file a local source names into the model folder `out_dir` (being built: the caller's
    atomic_dir); return what lineage.json records of it (its name, sha256, size, quantization, architecture).

    The weights as transformers' GGUF loader dequantizes them, in float32: the folder's logits equal those of
    `from_pretrained(..., gguf_file=...)` exactly (bfloat16 would halve the size but not keep a 4-bit model's
    values). The tokenizer as transformers builds it from the metadata, its chat template included."""
    from lexalign.core.io import sha256_file

    header = check_gguf_source(path, gguf_file, key)
    file, out_dir = header.path, Path(out_dir)
    sha256 = sha256_file(file)
    try:
        tokenizer, model = _load(file)
    except Exception as err:  # transformers' and numpy's errors on a file the header check let through
        if isinstance(err, LexAlignError) or getattr(err, "errno", None) == errno.ENOSPC:
            raise
        raise LexAlignError(f'Could not read the GGUF file "{file}"', f"{type(err).__name__}: {str(err)[:300]}",
                            hint="Check the file (download it again), or use the model's Hugging Face folder") from None
    _clean(model, tokenizer, header)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # safetensors writes its files readable by their owner alone, whatever the umask: give them a file's usual mode
    umask = os.umask(0)
    os.umask(umask)
    for weights in out_dir.glob("*.safetensors"):
        weights.chmod(0o666 & ~umask)
    record = {"file": file.name, "sha256": sha256, "size": header.file_size, "quantization": header.quantization,
              "architecture": header.architecture, "tensor_types": header.tensor_types}
    return {**record, "license": header.license} if header.license else record


def _load(file: Path):
    """transformers' tokenizer and model from the GGUF. `GgufConfig(dequantize=True)`: dense float weights from
    every loader (the newer one keeps them packed where a kernel runs them), and a model save_pretrained accepts
    (it drops the GGUF quantizer, which refuses to be saved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    where = {"pretrained_model_name_or_path": str(file.parent), "gguf_file": file.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(**where)
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    return tokenizer, model


def _clean(model, tokenizer, header: GgufHeader) -> None:
    """What a folder of the model should say, not what the GGUF loader left: no quantization (the weights are
    dense), no GGUF name as a path, the special tokens' ids from the metadata, and the context length as the
    tokenizer's limit (a GGUF has no model_max_length; transformers would save 1e30)."""
    from transformers import GenerationConfig

    config = model.config
    for name in ("quantization_config", "_model_name_or_path"):
        if name in config.__dict__:
            delattr(config, name)
    config.name_or_path = ""
    ids = {name: header.metadata.get(f"tokenizer.ggml.{gguf_name}") for name, gguf_name in
           (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id"))}
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"]
    model.generation_config = GenerationConfig(**{name: value for name, value in ids.items() if value is not None})
    context = getattr(config, "max_position_embeddings", None)
    if context:
        tokenizer.model_max_length = context
        tokenizer.init_kwargs["model_max_length"] = context
    for name in ("is_local", "local_files_only", "gguf_file", "name_or_path"):  # the loader's bookkeeping
        tokenizer.init_kwargs.pop(name, None)
