"""Weights stored as integer codes in blocks along the input dimension, and the layers that read them.

    W[o, b*B + j] = scale[o, b] * (q[o, b, j] - offset) + minimum[o, b]        (no minimum: + 0)

- int8 (GGUF Q8_0's layout): B = 32, int8 codes, an fp16 scale per block: 34 bytes per 32 weights.
- int4 (GGUF Q4_1's layout): B = 32, codes 0..15 two to a byte (byte j of a block holds weight j in its low
  nibble and weight j + 16 in its high one), an fp16 scale and minimum per block: 20 bytes per 32 weights.

GGUF's other block types map onto the same form exactly (ggml.py: Q4_0 is int4 with offset 8 and no
minimum; Q5_0 and Q6_K are int8 codes; Q4_K has fp32 scales). Dequantizing computes in float32 with the same
operations in the same order as the gguf package's reference, so a packed GGUF tensor dequantizes to exactly
the values gguf (and transformers' GGUF loader) produce.

Quantizing a float weight here rounds each block to its own codes: int8 symmetric (scale = absmax / 127),
int4 asymmetric (scale = (max - min) / 15, minimum = min), both with the fp16-rounded scale and minimum
that are stored, so the codes are the nearest to the weight given what dequantizing will use.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peftcli.quant.formats import BLOCK
from peftcli.quant.product import QuantLinear

_ROWS_AT_ONCE = 1024  # quantize this many rows at a time: bounded temporaries for a 7B's largest weights


class Blocks(nn.Module):
    """The codes, scales and (optional) minimums of one weight, (rows, in): buffers, so ``.to(device)``
    moves them. Shared by a tied output head and its embedding (GGUF files tie them).

    Scales and minimums are kept as their bit patterns (int16 for fp16, int32 for fp32), so a
    ``model.to(torch.bfloat16)`` cannot round them: it casts floating tensors only."""

    def __init__(self, codes: Tensor, scale: Tensor, minimum: Tensor | None = None, offset: int = 0):
        super().__init__()
        rows, blocks, width = codes.shape
        self.bits = 4 if codes.dtype == torch.uint8 else 8
        self.block = 2 * width if self.bits == 4 else width
        if scale.shape != (rows, blocks) or (minimum is not None and minimum.shape != scale.shape):
            raise ValueError(f"scales of shape {tuple(scale.shape)} for codes of shape {tuple(codes.shape)}")
        self.rows, self.columns, self.offset = rows, blocks * self.block, offset
        self.scale_dtype = scale.dtype
        self.register_buffer("codes", codes)
        self.register_buffer("scale_bits", as_bits(scale))
        self.register_buffer("minimum_bits", None if minimum is None else as_bits(minimum.to(scale.dtype)))

    @property
    def scale(self) -> Tensor:
        return self.scale_bits.view(self.scale_dtype)

    @property
    def minimum(self) -> Tensor | None:
        return None if self.minimum_bits is None else self.minimum_bits.view(self.scale_dtype)

    def dequantize(self, index: Tensor | None = None) -> Tensor:
        """Rows `index` (default: all) as float32, (*index.shape, columns)."""
        codes, scale, minimum = self.codes, self.scale, self.minimum
        if index is not None:
            codes, scale = codes[index], scale[index]
            minimum = None if minimum is None else minimum[index]
        if self.bits == 4:
            weight = unpack_nibbles(codes)
        else:
            weight = codes.to(torch.float32)
        if self.offset:
            weight.sub_(self.offset)
        weight.mul_(scale.to(torch.float32)[..., None])
        if minimum is not None:
            weight.add_(minimum.to(torch.float32)[..., None])
        return weight.view(*codes.shape[:-2], self.columns)

    def extra_repr(self) -> str:
        return f"rows={self.rows}, columns={self.columns}, bits={self.bits}, block={self.block}"


def unpack_nibbles(codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(..., n) bytes -> (..., 2n) values 0..15 as `dtype`: the low nibbles first, then the high ones (this
    module's int4 layout and ggml's 4-bit blocks), written into one new tensor."""
    n = codes.shape[-1]
    values = torch.empty((*codes.shape[:-1], 2 * n), dtype=dtype, device=codes.device)
    values[..., :n] = codes & 15
    values[..., n:] = codes >> 4
    return values


def as_bits(values: Tensor) -> Tensor:
    """A float tensor's bit pattern as the integer type of its width (fp16 -> int16, fp32 -> int32)."""
    return values.view({2: torch.int16, 4: torch.int32}[values.element_size()])


class BlockLinear(QuantLinear):
    """y = x W^T + b with W held as `Blocks` (see QuantLinear for the product)."""

    def __init__(self, blocks: Blocks, bias: Tensor | None, compute_dtype: torch.dtype, format: str):
        super().__init__(blocks.columns, blocks.rows, bias, compute_dtype)
        self.blocks, self.format = blocks, format

    def dequantize_float32(self) -> Tensor:
        return self.blocks.dequantize()


class BlockEmbedding(nn.Module):
    """An embedding table held as `Blocks`: a lookup dequantizes only the rows it reads."""

    def __init__(self, blocks: Blocks, compute_dtype: torch.dtype, padding_idx: int | None, format: str):
        super().__init__()
        self.blocks, self.compute_dtype, self.padding_idx, self.format = (
            blocks,
            compute_dtype,
            padding_idx,
            format,
        )
        self.num_embeddings, self.embedding_dim = blocks.rows, blocks.columns

    def forward(self, ids: Tensor) -> Tensor:
        return self.blocks.dequantize(ids).to(self.compute_dtype)

    @property
    def weight(self) -> Tensor:
        """The whole table, dense (for code that reads an embedding's weight, e.g. a prompt's text init)."""
        return self.blocks.dequantize().to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.format}"


def quantize(weight: Tensor, bits: int) -> Blocks:
    """`weight` (out, in), in % 32 == 0, as int8 (`bits` 8) or int4 (`bits` 4) blocks."""
    rows, columns = weight.shape
    if columns % BLOCK:
        raise ValueError(f"{columns} input features are not whole blocks of {BLOCK}")
    parts = [_quantize_rows(weight[i : i + _ROWS_AT_ONCE], bits) for i in range(0, rows, _ROWS_AT_ONCE)]
    codes, scale, minimum = (torch.cat(p) if p[0] is not None else None for p in zip(*parts, strict=True))
    if not bool(torch.isfinite(scale.float()).all()) or (
        minimum is not None and not torch.isfinite(minimum).all()
    ):
        raise ValueError("its values lie beyond fp16's range, or are not finite (inf, NaN)")
    return Blocks(codes, scale, minimum)


def _quantize_rows(weight: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor | None]:
    w = weight.to(torch.float32).reshape(weight.shape[0], -1, BLOCK)  # (rows, blocks, 32)
    if bits == 8:
        scale = _fp16(w.abs().amax(-1) / 127, up=True)
        codes = (w * _inverse(scale)[..., None]).round_().clamp_(-127, 127).to(torch.int8)
        return codes, scale, None
    minimum = _fp16(w.amin(-1), up=False)
    scale = _fp16((w.amax(-1) - minimum.float()) / 15, up=True)
    q = ((w - minimum.float()[..., None]) * _inverse(scale)[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    half = BLOCK // 2
    return q[..., :half] | (q[..., half:] << 4), scale, minimum


def _fp16(x: Tensor, up: bool) -> Tensor:
    """`x` in fp16 rounded up (or down): a scale never below the range's need, a minimum never above the
    block's, so every weight lies within the 15 (or +-127) steps and only rounds to its nearest code."""
    half = x.to(torch.float16)
    off = half.float() < x if up else half.float() > x
    toward = torch.full_like(half, float("inf") if up else float("-inf"))
    return torch.where(off, torch.nextafter(half, toward), half)


def _inverse(scale: Tensor) -> Tensor:
    """1 / scale in float32, 0 where a block is all zeros (its codes are then 0)."""
    scale = scale.to(torch.float32)
    return torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
