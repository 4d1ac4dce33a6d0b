"""quant/nf4.py: bitsandbytes' NF4 behind the shared frozen product.

Oracles: bitsandbytes' own Linear4bit (what transformers' BitsAndBytesConfig builds) holds the same codes
and dequantizes to the same weight; the product is a dense layer's on that weight; rounding stays within
half the widest gap between two NF4 levels.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from peftcli.errors import UserError
from peftcli.quant import nf4

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb


def test_same_codes_and_weight_as_bitsandbytes_linear4bit():
    torch.manual_seed(0)
    w = torch.randn(40, 72) * 0.05  # 2880 weights: 45 blocks of 64, one of them across two rows
    ours = nf4.NF4Linear(w, None, torch.float32)
    theirs = bnb.nn.Linear4bit(72, 40, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(
        w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False
    )
    theirs = theirs.to("cpu")  # quantizes
    assert torch.equal(ours.packed, theirs.weight.data)
    reference = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(ours.dequantize(), reference)


def test_rounding_error_is_within_half_the_widest_level_gap():
    """NF4 rounds each weight / absmax to the nearest of 16 levels in [-1, 1]; the widest gap is between
    -1 and the next level (-0.696), so the error is at most 0.152 x its block's absmax."""
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    layer = nf4.NF4Linear(w, None, torch.float32)
    absmax = w.reshape(-1, 64).abs().amax(-1, keepdim=True)
    error = (layer.dequantize() - w).reshape(-1, 64).abs()
    assert (error <= 0.152 * absmax + 1e-6).all()
    assert layer.stored_bytes() == w.numel() // 2 + w.numel() // 64 * 4


def test_product_equals_a_dense_layer_on_the_dequantized_weight():
    torch.manual_seed(2)
    layer = nf4.NF4Linear(torch.randn(24, 64) * 0.1, torch.randn(24), torch.float32)
    oracle = nn.Linear(64, 24)
    with torch.no_grad():
        oracle.weight.copy_(layer.dequantize())
        oracle.bias.copy_(layer.bias)
    x = torch.randn(3, 64)
    results = []
    for module in (layer, oracle):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        (out**2).sum().backward()
        results.append((out, xi.grad))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_a_clear_error_without_bitsandbytes(monkeypatch):
    monkeypatch.setattr(nf4.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install 'peftcli\[quant\]'"):
        nf4.NF4Linear(torch.randn(4, 64), None, torch.float32)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_model_loaded_whole_names_the_weight_it_cannot_quantize(kind):
    """quantize_model (the path for a model loaded whole) says which weight holds inf/NaN, one line."""
    from tiny import tiny_model

    from peftcli.quant import convert

    model = tiny_model("llama", "causal-lm")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match=rf"{kind} cannot hold `model.layers.0.self_attn.q_proj.weight`: "):
        convert.quantize_model(model, kind, torch.float32)
