"""A GGUF file's metadata and tensor names, read straight from its header (GGUF versions 2 and 3).

What `peft count` needs to tell a model's shapes and memory (shapes.py, memory.py), and what the loader
(models/filled.py, which reads each tensor's bytes itself: gguf_load.py) and `peft export` need besides:
the tensor table (name, shape, type, where its data lies) and, on request, the arrays' items (the
vocabulary). No tensor data, no torch, and not the gguf package's reader (only its table of tensor type
sizes), whose full parse of a 49k-token vocabulary takes ~5 s here (38 s under load) where this one takes
a tenth of a second. Without `arrays`, an array value comes back as an Array (its item type and length). It
checks what transformers' reader would refuse: strings that are not UTF-8, a key or a tensor given twice,
an unknown tensor type, tensor data running past the end of the file (a partial download).

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


class GGUFCutShort(GGUFError):
    """The file ends before its header or its tensor table says it does: a partial download or copy, which
    no reader can load."""


@dataclass(frozen=True)
class Array:
    item_type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table: its data is ``nbytes`` bytes at ``offset`` from the start of the file."""

    name: str
    shape: tuple[int, ...]  # row-major, as numpy and torch order it: ggml's dimensions reversed
    ggml_type: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    metadata: dict[str, object]
    tensors: list[TensorInfo]  # in file order
    types: dict[str, tuple[int, int | None]]  # key -> (value type, item type of an array)

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)


def read_header(path: str) -> tuple[dict[str, object], list[str]]:
    """(metadata by key, tensor names in file order); arrays as their Array (item type, length)."""
    gguf = read_gguf(path)
    return gguf.metadata, [t.name for t in gguf.tensors]


def read_gguf(path: str, arrays: bool = False) -> GGUFFile:
    """The metadata and the tensor table. With `arrays`, an array value comes back as a list of its items
    (a vocabulary of 49k strings takes ~0.1 s), else as its Array."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        try:
            if blob[:4] != b"GGUF":
                raise GGUFError("no GGUF magic")
            version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
            if version not in (2, 3):  # 1 had 32-bit lengths; a byte-swapped file reads as a huge version
                raise GGUFError(f"GGUF version {version}")
            pos, metadata, types = 24, {}, {}
            for _ in range(kv_count):
                key, pos = _string(blob, pos)
                (value_type,) = struct.unpack_from("<I", blob, pos)
                if key in metadata:
                    raise GGUFError(f"metadata key {key} given twice")
                if key == "general.alignment" and value_type != 4:
                    raise GGUFError("general.alignment is not a u32")
                item_type = struct.unpack_from("<I", blob, pos + 4)[0] if value_type == _ARRAY else None
                types[key] = (value_type, item_type)
                metadata[key], pos = _value(blob, pos + 4, value_type, arrays)
            alignment = metadata.get("general.alignment", 32)
            if alignment <= 0 or alignment & (alignment - 1):
                raise GGUFError(f"general.alignment {alignment} is not a power of two")
            table = []
            for _ in range(tensor_count):
                name, pos = _string(blob, pos)
                (ndims,) = struct.unpack_from("<I", blob, pos)
                dims = struct.unpack_from(f"<{ndims}Q", blob, pos + 4)
                ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * ndims)
                pos += 4 + 8 * ndims + 12
                table.append((name, dims, ggml_type, offset, _tensor_bytes(name, dims, ggml_type)))
        except struct.error as e:  # ran past the end
            raise GGUFCutShort(f"the header is cut short: the file ends at byte {len(blob)}") from e
        names = [name for name, *_ in table]
        if len(set(names)) != len(names):
            raise GGUFError("a tensor is named twice")
        data_start = -(-pos // alignment) * alignment
        data_end = max((offset + nbytes for *_, offset, nbytes in table), default=0)
        if data_start + data_end > len(blob):  # what a partial download looks like
            raise GGUFCutShort("the tensor data runs past the end of the file")
    tensors = [
        TensorInfo(name, tuple(reversed(dims)), ggml_type, data_start + offset, nbytes)
        for name, dims, ggml_type, offset, nbytes in table
    ]
    return GGUFFile(metadata, tensors, types)


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
        raise GGUFCutShort("a string runs past the end of the file")
    return blob[pos + 8 : end].decode("utf-8"), end  # strict: a UnicodeDecodeError is a ValueError too


def _skip_strings(blob, pos: int, count: int) -> int:
    """The position after `count` strings from `pos`, each checked as `_string` checks it: within the file
    and valid UTF-8. The items are checked in one decode, joined by a newline: a newline can neither end
    nor continue a multi-byte character, so the joined bytes are valid exactly when every item is."""
    pieces = []
    for _ in range(count):
        (length,) = struct.unpack_from("<Q", blob, pos)
        end = pos + 8 + length
        if end > len(blob):
            raise GGUFCutShort("a string runs past the end of the file")
        pieces.append(blob[pos + 8 : end])
        pos = end
    b"\n".join(pieces).decode("utf-8")
    return pos


def _value(blob, pos: int, value_type: int, arrays: bool = False) -> tuple[object, int]:
    if value_type == STRING_TYPE:
        return _string(blob, pos)
    if value_type == _ARRAY:
        item_type, length = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        items: list = []
        if item_type == STRING_TYPE:  # each item its own length: always checked, kept with `arrays`
            if arrays:
                for _ in range(length):
                    item, pos = _string(blob, pos)
                    items.append(item)
            else:
                pos = _skip_strings(blob, pos, length)
        elif item_type in _SCALARS:
            fmt = _SCALARS[item_type]
            size = length * struct.calcsize(fmt)
            if pos + size > len(blob):
                raise GGUFCutShort("an array runs past the end of the file")
            if arrays:
                items = list(struct.unpack_from(f"<{length}{fmt[1]}", blob, pos))
            pos += size
        else:
            raise GGUFError(f"array of type {item_type}")
        return (items if arrays else Array(item_type, length)), pos
    if value_type not in _SCALARS:
        raise GGUFError(f"value type {value_type}")
    fmt = _SCALARS[value_type]
    return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
