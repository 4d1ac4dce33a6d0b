"""GGUF tensor bytes packed straight into `Blocks` (blocks.py), without a float copy of the weight.

A GGUF weight of shape (out, in) is stored row by row, each row a run of blocks (ggml's layouts, as the gguf
package's ``quants.py`` reads them). Each type below becomes codes, scales and minimums of the form

    W = scale * (q - offset) + minimum

computed with the operations, in the order, the gguf package's reference dequantization uses, so the packed
weight dequantizes to exactly its values (tests/quant/test_ggml.py holds every type equal):

- Q4_0, 18 bytes per 32 (fp16 d, 16 bytes of nibbles): int4 codes, scale d, offset 8.
- Q4_1, 20 bytes per 32 (fp16 d, fp16 m, 16 bytes of nibbles): int4 codes, scale d, minimum m.
- Q8_0, 34 bytes per 32 (fp16 d, 32 int8): int8 codes, scale d.
- Q5_0, 22 bytes per 32 (fp16 d, 32 fifth bits, 16 bytes of nibbles): int8 codes q - 16, scale d.
- Q4_K, 144 bytes per 256 (fp16 d and dmin, 12 bytes of 6-bit scales sc and mins m, 128 bytes of nibbles):
  int4 codes per 32, fp32 scale d * sc, minimum -(dmin * m).
- Q6_K, 210 bytes per 256 (128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales sc, fp16 d): int8
  codes q - 32 per 16, fp32 scale d * sc.

Products of an fp16 value and a 6- or 8-bit integer are exact in fp32, so the fp32 scales of Q4_K and Q6_K
are the reference's own intermediate values. Any other type is not packed: the loader dequantizes it with the
gguf package, one tensor at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftcli.quant.blocks import Blocks, unpack_nibbles
from peftcli.quant.formats import PACKED_GGML


def packable(ggml_type: int) -> bool:
    return ggml_type in PACKED_GGML


def type_name(ggml_type: int) -> str:
    return PACKED_GGML[ggml_type][0]


def pack(raw: Tensor, ggml_type: int) -> Blocks:
    """`raw`: (rows, bytes per row) uint8, one weight's rows as stored. A packable type only."""
    name = type_name(ggml_type)
    return _PACKERS[name](raw)


def _split(raw: Tensor, block_bytes: int, *widths: int) -> list[Tensor]:
    """Each block's fields: (rows, blocks, width) each, contiguous; the last takes what is left."""
    blocks = raw.reshape(raw.shape[0], -1, block_bytes)
    fields, start = [], 0
    for width in (*widths, block_bytes - sum(widths)):
        fields.append(blocks[..., start : start + width].contiguous())
        start += width
    return fields


def _half(field: Tensor) -> Tensor:
    """(rows, blocks, 2) bytes -> (rows, blocks) fp16."""
    return field.view(torch.float16).squeeze(-1)


def _pack_nibbles(values: Tensor) -> Tensor:
    """(..., 32) values 0..15 -> (..., 16) bytes in blocks.py's int4 layout (low: j, high: j + 16)."""
    return values[..., :16] | (values[..., 16:] << 4)


def _q4_0(raw: Tensor) -> Blocks:
    d, qs = _split(raw, 18, 2)
    return Blocks(qs, _half(d), offset=8)


def _q4_1(raw: Tensor) -> Blocks:
    d, m, qs = _split(raw, 20, 2, 2)
    return Blocks(qs, _half(d), _half(m))


def _q8_0(raw: Tensor) -> Blocks:
    d, qs = _split(raw, 34, 2)
    return Blocks(qs.view(torch.int8), _half(d))


def _q5_0(raw: Tensor) -> Blocks:
    d, qh, qs = _split(raw, 22, 2, 4)
    high = qh.view(torch.int32)  # (rows, blocks, 1): bit i is weight i's fifth bit
    bits = (high >> torch.arange(32, dtype=torch.int32)) & 1
    q = unpack_nibbles(qs, torch.uint8) | (bits.to(torch.uint8) << 4)
    return Blocks((q.to(torch.int16) - 16).to(torch.int8), _half(d))


def _q4_k(raw: Tensor) -> Blocks:
    d, dmin, scales, qs = _split(raw, 144, 2, 2, 12)
    rows, supers = d.shape[:2]
    scales = scales.reshape(rows, supers, 3, 4)
    low, mins, both = scales[..., 0, :], scales[..., 1, :], scales[..., 2, :]
    sc = torch.cat([low & 0x3F, (both & 0x0F) | ((low >> 2) & 0x30)], dim=-1)  # (rows, supers, 8)
    m = torch.cat([mins & 0x3F, (both >> 4) | ((mins >> 2) & 0x30)], dim=-1)
    scale = _half(d).float()[..., None] * sc.float()  # (rows, supers, 8): exact in fp32
    minimum = -(_half(dmin).float()[..., None] * m.float())
    # 128 bytes = 4 chunks of 32: chunk i's low nibbles are sub-block 2i, its high nibbles sub-block 2i + 1
    values = unpack_nibbles(qs.reshape(rows, supers, 4, 32), torch.uint8).reshape(rows, supers * 8, 32)
    return Blocks(_pack_nibbles(values), scale.reshape(rows, -1), minimum.reshape(rows, -1))


def _q6_k(raw: Tensor) -> Blocks:
    ql, qh, scales, d = _split(raw, 210, 128, 64, 16)
    rows, supers = d.shape[:2]
    low = unpack_nibbles(ql.reshape(rows, supers, 2, 64), torch.uint8).reshape(rows, supers, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 1, 4, 1)
    high = ((qh.reshape(rows, supers, 2, 1, 32) >> shifts) & 3).reshape(rows, supers, 8, 32)
    q = ((low | (high << 4)).to(torch.int16) - 32).to(torch.int8)
    scale = _half(d).float()[..., None] * scales.view(torch.int8).float()  # (rows, supers, 16)
    return Blocks(q.reshape(rows, supers * 16, 16), scale.reshape(rows, -1))


_PACKERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q5_0": _q5_0, "Q4_K": _q4_k, "Q6_K": _q6_k}
