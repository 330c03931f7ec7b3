"""A LoRA adapter merged into its base model's files tensor by tensor, without loading the model.

Merging through PEFT (`loading.merged_model`) loads the whole base in float32 beside the trained model: for a bf16
or 4-bit base that is the job's memory peak (SmolLM2's bf16 job on the CPU: +0.5 GB at the save; a 7B QLoRA job
would need 28 GB more). Here each base tensor is read from its file, the adapter's B @ A x scaling added to it (the
ops and order of PEFT's `Linear.merge`, so the bytes are the same), written and freed: memory for one tensor.

Only a plain LoRA on linear layers takes this road (`streamable`); anything else (DoRA, rsLoRA's rank patterns,
biases, saved modules, embedding LoRA, fan_in_fan_out, keys the base files do not have) returns False and the
caller merges through PEFT as before. Files are read with plain reads, not mapped: mapped pages of the base would
count in the process's memory until the file is closed.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch

ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# LoraConfig fields that change what merging means: merged here only when each is off (empty, false or absent).
UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
               "trainable_token_indices", "target_parameters", "layer_replication")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where its data starts."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(size)), 8 + size


def read_tensor(handle, entry: dict, data_start: int) -> torch.Tensor:
    begin, end = entry["data_offsets"]
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    handle.seek(data_start + begin)
    handle.readinto(memoryview(buffer.numpy()))
    return buffer.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def base_files(base: Path) -> dict[str, str] | None:
    """Tensor name -> file name of the base's safetensors (one file or an index), or None (no safetensors)."""
    index = base / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = base / "model.safetensors"
    return dict.fromkeys(read_header(single)[0].keys() - {"__metadata__"}, single.name) if single.is_file() else None


def streamable(adapter_dir: Path, base: Path) -> tuple[dict, dict[str, str]] | None:
    """(base weight name -> (A, B, scaling), the base's tensor -> file map) when the adapter can be merged here."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA" or any(config.get(key) for key in UNSUPPORTED):
        return None
    files = base_files(base)
    weights = adapter_dir / "adapter_model.safetensors"
    if files is None or not weights.is_file():
        return None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights).items():
        match = ADAPTER_KEY.match(key)
        if match is None:  # a bias, an embedding's LoRA, a saved module: PEFT's merge knows them
            return None
        parts.setdefault(f"{match['module']}.weight", {})[match["part"]] = tensor
    if not parts or any(name not in files or len(ab) != 2 for name, ab in parts.items()):
        return None
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return {name: (ab["A"], ab["B"], scaling) for name, ab in parts.items()}, files


def write_merged(path: Path, source: Path, names: list[str], deltas: dict) -> int:
    """Write `names` from the base file `source` into `path` as float32 (integers as they are), the adapter's
    delta added to the merged weights; the bytes written."""
    header, start = read_header(source)
    out: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        entry = header[name]
        dtype = torch.float32 if DTYPES[entry["dtype"]].is_floating_point else DTYPES[entry["dtype"]]
        size = math.prod(entry["shape"]) * torch.empty((), dtype=dtype).element_size()
        out[name] = {"dtype": NAMES[dtype], "shape": entry["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(out, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(source, "rb") as handle, open(path, "wb") as sink:
        sink.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in names:
            tensor = read_tensor(handle, header[name], start)
            if tensor.is_floating_point():
                tensor = tensor.to(torch.float32)
            if name in deltas:
                lora_a, lora_b, scaling = deltas[name]  # `tensor` is this function's own buffer
                tensor += (lora_b.float() @ lora_a.float()) * scaling  # PEFT's Linear.merge: W += (B @ A) * s
            sink.write(memoryview(tensor.contiguous().numpy()).cast("B"))
    return offset


def merge_into_files(adapter_dir: Path, base: Path, out_dir: Path) -> bool:
    """Write base + adapter into `out_dir` as float32 safetensors (the base's shards and names) with the base's
    config; False (nothing written) when the adapter is not one `streamable` takes."""
    from transformers import AutoConfig, GenerationConfig

    plan = streamable(Path(adapter_dir), Path(base))
    if plan is None:
        return False
    deltas, files = plan
    by_file: dict[str, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    sizes = {file: write_merged(out_dir / file, Path(base) / file, sorted(names), deltas)
             for file, names in by_file.items()}
    if len(by_file) > 1:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(files.items()))}, indent=2))
    config = AutoConfig.from_pretrained(base)
    config.dtype = torch.float32  # what the weights now are (the reload route loads and saves float32 too)
    config.save_pretrained(out_dir)
    if (Path(base) / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(base).save_pretrained(out_dir)
    return True
