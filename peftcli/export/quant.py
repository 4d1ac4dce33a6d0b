"""The tensor types an export writes, and which tensor gets which.

``--quant`` names one type for the weight matrices: f32, f16, bf16, or llama.cpp's block types q8_0 (one
f16 scale per 32 int8 values), q4_0 (a scale per 32 4-bit values) and q4_1 (a scale and a minimum per 32).
Vectors (norms, biases) stay f32, as llama.cpp's converter keeps them; a matrix whose rows are not whole
blocks of 32 is written f16. The quantizers are the gguf package's numpy ports of llama.cpp's reference ones.

Without ``--quant``, a run on a GGUF base keeps the base's own types tensor by tensor (the packaged SmolLM2:
q4_1 matrices and a q8_0 embedding): an unchanged tensor is copied byte for byte, and a changed one (an
adapted layer, folded) is quantized again, to its base type where that is 8-bit or float, else to q8_0. A 4-
or 5-bit grid is too coarse for the change: the adapter moves a weight by much less than the grid's step, so
requantizing rounds the change away (on the quickstart run, q4_1 kept 6% of the folded LoRA's change, as its
projection onto the change, and added noise 1.24x the change's size; q8_0 kept 100%), and llama.cpp then
answers like the base. Any other base exports f16.
"""

from __future__ import annotations

import numpy as np

from peftcli.errors import UserError

# ggml type ids (gguf.GGMLQuantizationType), by --quant name
QUANTS = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3}
F32, F16 = QUANTS["f32"], QUANTS["f16"]
BLOCK_TYPES = {QUANTS["q8_0"], QUANTS["q4_0"], QUANTS["q4_1"]}
# the base types a changed tensor is written in again (fine enough to hold an adapter's change)
HOLDS_CHANGES = {QUANTS["f32"], QUANTS["f16"], QUANTS["bf16"], QUANTS["q8_0"]}
BLOCK = 32
# general.file_type: llama.cpp's "mostly <type>" code for each --quant
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "bf16": 32}


def parse_quant(name: str | None) -> int | None:
    if name is None:
        return None
    key = name.lower()
    if key not in QUANTS:
        raise UserError(f"--quant: unknown type {name!r}; choose {', '.join(QUANTS)}")
    return QUANTS[key]


def type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(ggml_type).name.lower()


def choose_type(shape: tuple[int, ...], quant: int | None, base_type: int | None, changed: bool) -> int:
    """The type of one tensor: `quant` (--quant), else its `base_type` in a GGUF base (q8_0 where the base
    type of a `changed` tensor is coarser than 8 bits), else f16; vectors f32 always."""
    if len(shape) < 2:
        return F32
    if quant is None:
        if base_type is None:
            quant = F16
        elif changed and base_type not in HOLDS_CHANGES:
            quant = QUANTS["q8_0"]
        else:
            quant = base_type
    if quant in BLOCK_TYPES and shape[-1] % BLOCK:
        return F16
    return quant


def quantize(array: np.ndarray, ggml_type: int) -> np.ndarray:
    """`array` (float32) in `ggml_type`: a float array for f32/f16, else the packed bytes (uint8)."""
    if ggml_type == F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if ggml_type == F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    return gguf_quantize(np.ascontiguousarray(array, dtype=np.float32), GGMLQuantizationType(ggml_type))


def nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(shape)) // block * size
