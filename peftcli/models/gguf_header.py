"""A GGUF file's metadata and tensor names, read straight from its header (GGUF versions 2 and 3).

What `peft count` needs to tell a model's shapes (shapes.py), and where each tensor's bytes lie (the packed
loader, models/gguf_weights.py, reads them itself): no tensor data, no torch, and not the gguf package's
reader (only its table of tensor type sizes), whose full parse of a 49k-token vocabulary takes ~5 s here.
An array value comes back as an Array (its item type and length), never its items. It checks what
transformers' reader would refuse: strings that are not UTF-8, a key or a tensor given twice, an unknown
tensor type, tensor data running past the end of the file (a partial download).

Layout (little-endian): "GGUF", version u32, tensor count u64, metadata count u64; then each metadata
entry as key (string), value type u32, value; then each tensor as name (string), dimension count u32,
dimensions u64 each, data type u32, offset u64. A string is a u64 byte length and UTF-8 bytes.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass

# value type -> struct format of the scalar types; 8 is a string, 9 an array
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
STRING_TYPE, _ARRAY = 8, 9


class GGUFError(ValueError):
    """Not a GGUF file this reader understands."""


@dataclass(frozen=True)
class Array:
    item_type: int
    length: int


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the table; ``dims`` as GGUF lists them, fastest-varying first: (in, out) for a weight."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    start: int  # absolute offset of its data in the file
    nbytes: int


def read_header(path: str) -> tuple[dict[str, object], list[str]]:
    """(metadata by key, tensor names in file order)."""
    metadata, tensors = read_tensor_table(path)
    return metadata, [t.name for t in tensors]


def read_tensor_table(path: str) -> tuple[dict[str, object], list[TensorEntry]]:
    """(metadata by key, every tensor's entry in file order), checked as the module docstring says."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        try:
            if blob[:4] != b"GGUF":
                raise GGUFError("no GGUF magic")
            version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
            if version not in (2, 3):  # 1 had 32-bit lengths; a byte-swapped file reads as a huge version
                raise GGUFError(f"GGUF version {version}")
            pos, metadata = 24, {}
            for _ in range(kv_count):
                key, pos = _string(blob, pos)
                (value_type,) = struct.unpack_from("<I", blob, pos)
                if key in metadata:
                    raise GGUFError(f"metadata key {key} given twice")
                if key == "general.alignment" and value_type != 4:
                    raise GGUFError("general.alignment is not a u32")
                metadata[key], pos = _value(blob, pos + 4, value_type)
            alignment = metadata.get("general.alignment", 32)
            if alignment <= 0 or alignment & (alignment - 1):
                raise GGUFError(f"general.alignment {alignment} is not a power of two")
            entries, data_end = [], 0
            for _ in range(tensor_count):
                name, pos = _string(blob, pos)
                (ndims,) = struct.unpack_from("<I", blob, pos)
                dims = struct.unpack_from(f"<{ndims}Q", blob, pos + 4)
                ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * ndims)
                pos += 4 + 8 * ndims + 12
                nbytes = _tensor_bytes(name, dims, ggml_type)
                data_end = max(data_end, offset + nbytes)
                entries.append((name, tuple(dims), ggml_type, offset, nbytes))
        except struct.error as e:  # ran past the end
            raise GGUFError(f"truncated header: {e}") from e
        if len({e[0] for e in entries}) != len(entries):
            raise GGUFError("a tensor is named twice")
        data_start = -(-pos // alignment) * alignment
        if data_start + data_end > len(blob):  # what a partial download looks like
            raise GGUFError("the tensor data runs past the end of the file")
    tensors = [TensorEntry(name, dims, kind, data_start + start, n) for name, dims, kind, start, n in entries]
    return metadata, tensors


def _tensor_bytes(name: str, dims: tuple[int, ...], ggml_type: int) -> int:
    """Bytes of one tensor's data, from its ggml type's block size (the gguf package's table)."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError as e:
        raise GGUFError("the gguf package is not installed") from e
    if ggml_type not in GGML_QUANT_SIZES:
        raise GGUFError(f"tensor {name}: unknown ggml type {ggml_type}")
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    elements = math.prod(dims)
    if elements % block:
        raise GGUFError(f"tensor {name}: {elements} elements are not whole blocks of {block}")
    return elements // block * block_bytes


def _string(blob, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    end = pos + 8 + length
    if end > len(blob):
        raise GGUFError("a string runs past the end of the file")
    return blob[pos + 8 : end].decode("utf-8"), end  # strict: a UnicodeDecodeError is a ValueError too


def _value(blob, pos: int, value_type: int) -> tuple[object, int]:
    if value_type == STRING_TYPE:
        return _string(blob, pos)
    if value_type == _ARRAY:
        item_type, length = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if item_type == STRING_TYPE:  # each item its own length: checked, not kept
            for _ in range(length):
                _, pos = _string(blob, pos)
        elif item_type in _SCALARS:
            pos += length * struct.calcsize(_SCALARS[item_type])
        else:
            raise GGUFError(f"array of type {item_type}")
        return Array(item_type, length), pos
    if value_type not in _SCALARS:
        raise GGUFError(f"value type {value_type}")
    fmt = _SCALARS[value_type]
    return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
