"""quant/ggml.py: GGUF block bytes packed into blocks.py's layout, exactly.

Oracle: the gguf package's own dequantization (gguf.quants.dequantize), which transformers' GGUF loader uses:
every packed type must give its values bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from gguf.constants import GGML_QUANT_SIZES

from peftcli.quant import ggml
from peftcli.quant.formats import PACKED_GGML

# where each type keeps its fp16 fields (d, m, dmin) inside a block
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q5_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}


def random_blocks(kind: GGMLQuantizationType, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """Random block bytes (every code pattern) with finite fp16 scales: (rows, bytes per row)."""
    rng = np.random.default_rng(seed)
    block, block_bytes = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows, columns // block, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[kind.name]:
        scales = rng.normal(0, 0.05, (rows, columns // block, 1)).astype(np.float16)
        raw[..., offset : offset + 2] = scales.view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("name", [name for name, _ in PACKED_GGML.values()])
def test_packed_blocks_dequantize_exactly_as_gguf_does(name):
    kind = GGMLQuantizationType[name]
    raw = random_blocks(kind, rows=5, columns=512)
    packed = ggml.pack(torch.from_numpy(raw.copy()), int(kind))
    reference = quants.dequantize(raw, kind)  # (5, 512) float32
    assert packed.dequantize().dtype == torch.float32
    assert np.array_equal(packed.dequantize().numpy(), reference)
    # rows one at a time (an embedding lookup) give the same values
    assert np.array_equal(packed.dequantize(torch.tensor([3, 0])).numpy(), reference[[3, 0]])


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0", "Q5_0"])
def test_packing_what_gguf_quantizes(name):
    """Bytes gguf itself wrote from real-valued weights (not only random bytes) pack exactly too."""
    kind = GGMLQuantizationType[name]
    weights = np.random.default_rng(3).normal(0, 0.02, (8, 256)).astype(np.float32)
    raw = quants.quantize(weights, kind)
    packed = ggml.pack(torch.from_numpy(raw.copy()), int(kind))
    assert np.array_equal(packed.dequantize().numpy(), quants.dequantize(raw, kind))


def test_q4_1_and_q8_0_keep_the_files_bytes():
    """The packed sizes are the file's own: 20 and 34 bytes per 32 weights."""
    for name, size in (("Q4_1", 20), ("Q8_0", 34)):
        kind = GGMLQuantizationType[name]
        packed = ggml.pack(torch.from_numpy(random_blocks(kind, 4, 256)), int(kind))
        assert sum(t.numel() * t.element_size() for t in packed.buffers()) == 4 * 256 // 32 * size
