"""A llama-architecture GGUF file's tensors, read one at a time in the layout transformers holds them.

Names map as gguf_names.py says (``output`` absent: the head is tied to the embedding). As transformers'
GGUF loader knows (modeling_gguf_pytorch_utils.py), llama.cpp's converter permutes
the rows of the query and key weights (rotary pairs interleaved rather than split in halves); reading them
back takes the inverse permutation of the rows, which is exact on packed blocks too (a block never crosses a
row).

Data is read with plain file reads (no memory map, whose touched pages would count in the process's RSS
for as long as the file stays mapped).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from peftcli.models.gguf_header import TensorEntry
from peftcli.quant.formats import FLOAT_GGML


def rows_of(entry: TensorEntry) -> tuple[int, int]:
    """(rows, values per row) of a tensor: a weight's (out, in); a vector is one row."""
    columns = entry.dims[0]
    return math.prod(entry.dims[1:]), columns


def read_rows(f, entry: TensorEntry) -> Tensor:
    """The tensor's bytes, (rows, bytes per row) uint8."""
    raw = torch.empty(entry.nbytes, dtype=torch.uint8)
    f.seek(entry.start)
    if f.readinto(memoryview(raw.numpy())) != entry.nbytes:
        raise ValueError(f"{entry.name}: the file ends inside its data")
    rows, _ = rows_of(entry)
    return raw.view(rows, -1)


def unpermute(gguf_name: str, raw: Tensor, heads: int, kv_heads: int) -> Tensor:
    """The query / key rows in transformers' order (the inverse of llama.cpp's permutation); others as given.

    Rows of a head come as (dim / 2 pairs, 2); transformers wants (2 halves, dim / 2)."""
    if ".attn_q." in gguf_name:
        groups = heads
    elif ".attn_k." in gguf_name:
        groups = kv_heads
    else:
        return raw
    half = raw.shape[0] // groups // 2
    return raw.reshape(groups, half, 2, -1).transpose(1, 2).reshape(raw.shape)


def dense(raw: Tensor, entry: TensorEntry) -> Tensor:
    """The tensor as float32, shaped as transformers holds it ((out, in), or a vector): float types by
    their bytes, any other type through the gguf package's dequantization."""
    rows, columns = rows_of(entry)
    kind = FLOAT_GGML.get(entry.ggml_type)
    if kind is not None:
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]
        values = raw.reshape(-1).view(dtype).to(torch.float32)
    else:
        from gguf import GGMLQuantizationType, quants

        values = torch.from_numpy(
            quants.dequantize(raw.numpy(), GGMLQuantizationType(entry.ggml_type)).copy()
        )
    shape = (rows, columns) if len(entry.dims) > 1 else (columns,)
    return values.reshape(shape)
