"""fast/lora.py: LoRA's in-place forward gives the formula's loss and gradients, and adds in place."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tiny import assert_lora_dropout, assert_lora_dtypes, assert_lora_formula, lora_layer
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftcli.fast import lora as fast_lora
from peftcli.methods import lora


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "mkl"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_inplace_forward_has_the_plain_formula_loss_and_gradients(kind, onednn):
    assert_lora_formula(kind, lambda layer: fast_lora.install(layer, onednn))


def test_autocast_and_fp32_factors_on_a_half_base():
    assert_lora_dtypes(fast_lora.install)


def test_dropout_is_skipped_at_zero_and_applied_otherwise():
    assert_lora_dropout(fast_lora.install)


def graph_ops(tensor: torch.Tensor) -> Counter[str]:
    """How many nodes of each type the autograd graph of `tensor` has."""
    ops, seen, stack = Counter(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            ops[type(node).__name__] += 1
            stack.extend(next_node for next_node, _ in node.next_functions)
    return ops


@pytest.mark.parametrize("base", [nn.Linear(12, 10), Conv1D(10, 12)], ids=["linear", "conv1d"])
def test_forward_adds_in_place_without_a_gradient_copy(base):
    # The low-rank term goes into the base output with one addmm_; an in-place add on a view would
    # record CopySlices (a full-size gradient copy), and the plain formula a full-size Mul.
    layer = lora_layer(base.requires_grad_(False), fast_lora.install)
    ops = graph_ops(layer(torch.randn(3, 5, 12, requires_grad=True)))
    # two products: the frozen base's (a Linear's through oneDNN, see frozen_linear) and the low-rank add
    if isinstance(base, nn.Linear):
        assert ops["_FrozenLinearBackward"] == 1 and ops["AddmmBackward0"] == 1
    else:
        assert ops["AddmmBackward0"] == 2
    assert not ops.keys() & {"CopySlices", "MulBackward0", "AddBackward0"}


def test_undo_restores_the_plain_forward():
    layer = lora_layer(nn.Linear(12, 10))
    undo = fast_lora.install(layer)
    assert layer.run is not lora.run
    undo()
    assert layer.run is lora.run
    ops = graph_ops(layer(torch.randn(3, 12, requires_grad=True)))
    assert "_FrozenLinearBackward" not in ops  # the plain forward: F.linear throughout


@pytest.mark.parametrize("base", [nn.Linear(12, 10), Conv1D(10, 12)], ids=["linear", "conv1d"])
def test_dora_forward_builds_the_direction_in_place(base):
    # W x and the low-rank term share one buffer (one fused addmm_), and the magnitude's rescaling is the only
    # full-size product: no scaled copy of the low-rank term, no sum of two full-size outputs.
    # (Its loss and gradients against the formula: tests/methods/test_dora.py.)
    layer = lora.wrap_layer(base.requires_grad_(False), rank=3, alpha=6.0, use_dora=True)
    fast_lora.install(layer)
    assert layer.run.func is fast_lora.dora_forward
    ops = graph_ops(layer(torch.randn(3, 5, 12, requires_grad=True)))
    assert ops["AddmmBackward0"] == 1 and ops["MulBackward0"] == 1
    assert ops["AddBackward0"] == 1  # the bias, added in place to the rescaled output
    assert "CopySlices" not in ops


def test_dora_with_dropout_in_training_takes_the_plain_forward():
    layer = lora.wrap_layer(nn.Linear(8, 8), rank=2, alpha=4.0, use_dora=True, dropout=0.5)
    fast_lora.install(layer)
    layer.train()
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    fast = layer(x)
    torch.manual_seed(0)
    torch.testing.assert_close(fast, lora.run_dora(layer, x), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_dora_forward_on_a_quantized_base_equals_the_plain_form(bias):
    # A GGUF base keeps its blocks packed by default: DoRA's direction is the quantized layer's own product
    from peftcli.quant.convert import quantize_linear

    torch.manual_seed(0)
    dense = nn.Linear(64, 32, bias=bias)
    weight, bias = dense.weight.detach(), dense.bias.detach() if bias else None
    base = quantize_linear(weight, bias, "int8", torch.float32)
    layer = lora.wrap_layer(base, rank=4, alpha=8.0, use_dora=True)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 64)
    expected = lora.run_dora(layer, x)
    fast_lora.install(layer)
    torch.testing.assert_close(layer(x), expected)
