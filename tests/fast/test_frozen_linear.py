"""The oneDNN product for frozen weights equals F.linear, passes the same input gradient, and steps aside
wherever it does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import close

from peftcli.fast import frozen_linear


def operands(bias: bool = True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 48, generator=g, requires_grad=True)
    weight, b = torch.randn(70, 48, generator=g), torch.randn(70, generator=g) if bias else None
    return x, weight, b


def test_this_torch_build_has_the_onednn_path():
    # CI runs the CPU wheel the README installs; without oneDNN the tests below would pass vacuously
    assert frozen_linear._onednn() is not None
    assert frozen_linear.usable(*operands())


@pytest.mark.parametrize("bias", [True, False])
def test_value_and_input_gradient_equal_f_linear(bias):
    x, weight, b = operands(bias)
    upstream = torch.randn(37, 70)
    out = frozen_linear.linear(x, weight, b)
    assert type(out.grad_fn).__name__ == "_FrozenLinearBackward"
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)
    reference = F.linear(x, weight, b)
    (reference_grad,) = torch.autograd.grad((reference * upstream).sum(), x)
    assert close(out, reference) and close(grad, reference_grad)
    with torch.no_grad():
        assert torch.equal(frozen_linear.linear(x, weight, b), out)  # no-grad path: the same kernel


@pytest.mark.parametrize(
    "case",
    ["trainable weight", "bfloat16", "non-contiguous", "3-d input", "strided bias", "autocast"],
)
def test_falls_back_to_f_linear_where_it_does_not_apply(case):
    x, weight, b = operands()
    if case == "trainable weight":
        weight.requires_grad_(True)
    elif case == "bfloat16":
        x, weight, b = x.detach().bfloat16().requires_grad_(), weight.bfloat16(), b.bfloat16()
    elif case == "non-contiguous":
        x = torch.randn(48, 37, requires_grad=True).t()
    elif case == "3-d input":
        x = x.detach().view(1, 37, 48).requires_grad_()
    elif case == "strided bias":  # oneDNN reads a bias as dense: a strided one would give wrong sums
        b = torch.randn(140)[::2]
    assert not frozen_linear.usable(x, weight, b) or case == "autocast"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        assert not frozen_linear.usable(x, weight, b)
        out = frozen_linear.linear(x, weight, b)
        reference = F.linear(x, weight, b)
    assert "FrozenLinear" not in type(out.grad_fn).__name__
    assert out.dtype == reference.dtype and torch.equal(out, reference)


def test_a_weight_or_bias_elsewhere_than_the_input_is_not_taken():
    # e.g. an offloaded layer's meta weight: oneDNN would read it as if it held numbers
    x, weight, b = operands()
    assert not frozen_linear.usable(x, weight.to("meta"), b)
    assert not frozen_linear.usable(x, weight, b.to("meta"))
