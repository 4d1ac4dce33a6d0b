"""safetensors files read and written one tensor at a time, for loading and merging models bigger than memory.

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the tensors' bytes. safetensors' own reader maps the whole file (all of a shard in RSS once
touched) and its writer builds the whole file in memory; these plain reads and writes hold one tensor.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from peftcli.errors import UserError
from peftcli.models.sources import ModelSource

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorInfo:
    code: str  # safetensors dtype code
    dtype: torch.dtype | None  # None: a code peftcli does not stream
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def safetensors_shards(source: ModelSource) -> list[Path] | None:
    """The model's safetensors files, when it is a local dir that has them (the single file, or the shards its
    index lists); None otherwise. (Tests and scripts/bench_merge.py patch merge.to_dir's name for this to
    force the in-memory merge.)"""
    if not source.is_local or source.gguf_file:
        return None
    root = Path(source.path)
    if (root / INDEX_NAME).is_file():
        try:
            weight_map = json.loads((root / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise UserError(f"{root / INDEX_NAME}: not a valid safetensors index ({e})") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise UserError(f"base model {source.name}: shard {missing[0]} listed in {INDEX_NAME} is missing")
        return [root / n for n in names]
    return [root / SINGLE_NAME] if (root / SINGLE_NAME).is_file() else None


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, in file order, without reading their data."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
        infos = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            dtype, shape = CODE_DTYPES.get(entry["dtype"]), tuple(int(n) for n in entry["shape"])
            if dtype is not None and end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{key}: {end - begin} bytes for shape {shape} of {entry['dtype']}")
            if not 0 <= begin <= end <= size - 8 - length:
                raise ValueError(f"{key}: data outside the file")
            infos[key] = TensorInfo(entry["dtype"], dtype, shape, 8 + length + begin, 8 + length + end)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    return dict(sorted(infos.items(), key=lambda item: item[1].start))


def model_key(ckpt_key: str, expected, prefix: str) -> str | None:
    """The model's name for a checkpoint tensor (`expected`: the model's names): the same, or under the base
    model's prefix (a checkpoint of LlamaModel stores `layers.0...`, LlamaForCausalLM `model.layers.0...`)."""
    if ckpt_key in expected:
        return ckpt_key
    if prefix and f"{prefix}.{ckpt_key}" in expected:
        return f"{prefix}.{ckpt_key}"
    return None


def read_tensor(f, info: TensorInfo) -> Tensor:
    tensor = torch.empty(info.shape, dtype=info.dtype)
    if tensor.numel():
        f.seek(info.start)
        if f.readinto(memoryview(_bytes_of(tensor))) != info.end - info.start:
            raise UserError(f"{f.name}: truncated safetensors file")
    return tensor


def _bytes_of(tensor: Tensor):
    """A writable uint8 view of a contiguous tensor's memory (little-endian, as safetensors stores it)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def write_safetensors(
    path: Path, specs: list[tuple[str, torch.dtype, tuple]], tensors: Iterator[Tensor]
) -> int:
    """Write `specs` (key, dtype, shape) in order, taking each tensor from `tensors` as it comes; returns
    the bytes of tensor data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {
            "dtype": DTYPE_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (key, dtype, shape), tensor in zip(specs, tensors, strict=True):
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise AssertionError(
                    f"{key}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}"
                )
            if tensor.numel():
                f.write(_bytes_of(tensor.contiguous()))
    return offset
