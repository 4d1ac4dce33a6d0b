"""quant/blocks.py and quant/product.py: int8 / int4 blocks, the frozen product and the packed embedding.

Oracles: the math of each format (the error bound of rounding to the nearest code), and a dense nn.Linear
holding the dequantized weight (the product must give what it gives, forward and backward).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftcli.quant import blocks
from peftcli.quant.product import QuantLinear


def weight(rows: int = 48, columns: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
    w[1, 32:64] = 0.3  # a constant block
    return w


def per_weight(scale: torch.Tensor, block: int) -> torch.Tensor:
    """(rows, blocks) -> (rows, blocks * block): each block's value repeated over its weights."""
    return scale.float().repeat_interleave(block, dim=1)


@pytest.mark.parametrize("bits", [8, 4])
def test_rounding_error_is_within_half_a_step(bits):
    """Round to nearest: |w - w'| <= step / 2 per block, step = the stored fp16 scale. The fp16 scale is
    rounded up and the minimum down, so every weight lies inside the codes' range (no clamping); the
    dequantizing arithmetic adds float32 rounding (< 1e-7 here)."""
    w = weight()
    packed = blocks.quantize(w, bits)
    error = (packed.dequantize() - w).abs()
    assert (error <= 0.5 * per_weight(packed.scale, 32) + 1e-7).all()
    assert torch.equal(packed.dequantize()[0, :32], torch.zeros(32))
    assert packed.codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    # int8: 32 codes + an fp16 scale per 32 weights; int4: 16 bytes + fp16 scale and minimum
    stored = sum(t.numel() * t.element_size() for t in packed.buffers())
    assert stored == w.numel() // 32 * (34 if bits == 8 else 20)


def test_quantize_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="blocks of 32"):
        blocks.quantize(torch.randn(4, 40), 4)
    with pytest.raises(ValueError, match="beyond fp16's range"):
        blocks.quantize(torch.full((2, 32), 1e9), 8)
    with pytest.raises(ValueError, match="not finite"):
        blocks.quantize(torch.full((2, 32), float("nan")), 4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_product_equals_a_dense_layer_on_the_dequantized_weight(bits, dtype):
    """Forward, the input's gradient and a trainable bias's gradient: those of nn.Linear holding the
    dequantized weight (rounded once to the product's dtype). Same weight, same products: equal up to the
    order of a sum (1e-6 in fp32). In bf16 the bias is added to a rounded product here and inside the
    product there, so sums of bf16 values (8 significant bits) differ by a few of their last bits: 2% of
    each tensor's scale."""
    w, bias = weight(), torch.randn(48) * 0.1
    layer = blocks.BlockLinear(blocks.quantize(w, bits), bias, dtype, f"int{bits}")
    layer.bias.requires_grad_(True)  # as BitFit trains it
    oracle = nn.Linear(96, 48, dtype=dtype)
    with torch.no_grad():
        oracle.weight.copy_(layer.dequantize(torch.float32).to(dtype))
        oracle.bias.copy_(bias.to(dtype))
    x = torch.randn(3, 5, 96, dtype=dtype)
    grads = []
    for module in (layer, oracle):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        (out.float() ** 2).sum().backward()
        grads.append((out, xi.grad, module.bias.grad))
    for ours, theirs in zip(*grads, strict=True):
        assert ours.dtype == theirs.dtype
        scale = float(theirs.abs().max())
        tolerance = 1e-6 if dtype == torch.float32 else 0.02 * scale
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)


def test_product_keeps_no_dense_weight_for_backward():
    """Autograd saves nothing of the product's: no (out, in) tensor lives from forward to backward."""
    layer = blocks.BlockLinear(blocks.quantize(weight(), 4), None, torch.float32, "int4")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(torch.randn(2, 96, requires_grad=True)).sum().backward()
    assert (48, 96) not in saved and (96, 48) not in saved


def test_frozen_layer_without_trainable_input_builds_no_graph():
    layer = blocks.BlockLinear(blocks.quantize(weight(), 8), None, torch.float32, "int8")
    assert not layer(torch.randn(2, 96)).requires_grad
    assert isinstance(layer, QuantLinear) and layer.in_features == 96 and layer.out_features == 48


def test_under_autocast_the_product_runs_in_the_autocast_dtype():
    layer = blocks.BlockLinear(blocks.quantize(weight(), 4), None, torch.float32, "int4")
    x = torch.randn(2, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x, layer.dequantize()), rtol=0.02, atol=0.02)


def test_embedding_reads_only_its_rows():
    w = weight(rows=20, columns=64)
    packed = blocks.quantize(w, 8)
    embedding = blocks.BlockEmbedding(packed, torch.float32, padding_idx=0, format="int8")
    ids = torch.tensor([[3, 0, 19], [7, 7, 1]])
    assert torch.equal(embedding(ids), F.embedding(ids, packed.dequantize()))
    assert embedding(ids).shape == (2, 3, 64)
    assert torch.equal(embedding.weight, packed.dequantize())


def test_casting_the_model_leaves_the_stored_weight_alone():
    """`model.to(torch.bfloat16)` casts floating tensors; scales are kept as integer bit patterns, so the
    dequantized weight does not move (only the layer's bias, a float parameter, is cast)."""
    layer = blocks.BlockLinear(blocks.quantize(weight(), 4), torch.ones(48), torch.float32, "int4")
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.dequantize(torch.float32), before) and layer.bias.dtype == torch.bfloat16
