"""LoRA's and DoRA's forwards for training, same math as methods/lora.py's `run` and `run_dora` with fewer
full-size tensors.

    LoRA:  out = W x + b;   out += scale * (x A^T) B^T     on (tokens, in) rows, in place
    DoRA:  d = W x;   d += scale * (x A^T) B^T;   out = d * m / ||W + scale B A||_row + b

The input is flattened to 2-D rows once, so the products are plain matrix products and the base output is
no view; the low-rank term is added into it with one fused ``addmm_`` (no full-size temporary, and its
backward passes the gradient through uncopied: autograd allows the in-place add because neither Linear nor
Conv1D saves its output for backward). The frozen base product of a plain ``nn.Linear`` runs through oneDNN
where that is faster (frozen_linear.py). At dropout 0 there is no dropout call and no copy of x.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftcli.fast import frozen_linear
from peftcli.methods import lora
from peftcli.methods.modules import AdaptedLayer
from peftcli.quant.convert import is_quantized


def forward(layer: AdaptedLayer, x: Tensor, linear: Callable = frozen_linear.linear) -> Tensor:
    """x: (..., in) -> (..., out), as lora.run computes it."""
    shape = (*x.shape[:-1], layer.out_features)
    x = x.reshape(-1, layer.in_features)  # (tokens, in): 2-D products, and an output that is no view
    out = _base_forward(layer, x, linear)  # (tokens, out)
    return _add_low_rank(layer, x, out).view(shape)


def dora_forward(layer: AdaptedLayer, x: Tensor, linear: Callable = frozen_linear.linear) -> Tensor:
    """x: (..., in) -> (..., out), as lora.run_dora computes it: the direction W x + scale B A x built as
    `forward` builds LoRA's output (without the bias), then times m / ||W + scale B A|| and plus the bias.
    With dropout active it needs W x and W dropout(x) both: lora.run_dora's own form."""
    if layer.dropout is not None and layer.training:
        return lora.run_dora(layer, x)
    shape = (*x.shape[:-1], layer.out_features)
    x = x.reshape(-1, layer.in_features)
    direction = _add_low_rank(layer, x, _base_forward(layer, x, linear, bias=False))  # (tokens, out)
    factor = layer.lora_magnitude_vector / lora.weight_norm(layer)  # (out,); backward keeps `direction`
    out = (direction * factor).to(direction.dtype)
    bias = layer.base.bias
    if bias is not None:
        out = out.add_(bias.to(out.dtype))  # the product's output is not kept for backward: in place
    return out.view(shape)


def _add_low_rank(layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
    """out + scale * (x A^T) B^T on (tokens, .) rows, in place where autograd allows it."""
    lora_a, lora_b = layer.lora_A.weight, layer.lora_B.weight
    h = x if layer.dropout is None else layer.dropout(x)
    # A frozen half-precision base with fp32 factors; autocast does this cast itself when on.
    if h.dtype != lora_a.dtype and not torch.is_autocast_enabled(h.device.type):
        h = h.to(lora_a.dtype)
    down = F.linear(h, lora_a)  # (tokens, in) @ (in, r) -> (tokens, r): the only product with x
    # The in-place add needs one dtype: the base output's (bf16 under autocast, fp32 factors or not).
    down, lora_b = down.to(out.dtype), lora_b.to(out.dtype)  # no-ops when they already agree
    if out._base is not None or not out.is_contiguous():
        return out + layer.scale * F.linear(down, lora_b)
    # out += scale * down @ B^T in one fused kernel; on a view it would copy the gradient instead.
    return out.addmm_(down, lora_b.t(), alpha=layer.scale)


def _base_forward(layer: AdaptedLayer, x: Tensor, linear: Callable, bias: bool = True) -> Tensor:
    """The frozen layer on (tokens, in); `bias=False`: its product alone."""
    b = layer.base.bias if bias else None
    if is_quantized(layer.base):  # its own product (dequantized blocks); DoRA's direction wants no bias
        out = layer.base(x)
        return out if bias or layer.base.bias is None else out - layer.base.bias.to(out.dtype)
    if layer.fan_in_fan_out:  # Conv1D's own forward returns a view; its math, y = b + x @ W, directly
        return torch.mm(x, layer.base.weight) if b is None else torch.addmm(b, x, layer.base.weight)
    if type(layer.base) is nn.Linear or not bias:
        return linear(x, layer.base.weight, b)
    return layer.base(x)


def install(model: nn.Module, onednn: bool = True) -> Callable[[], None]:
    """Route every LoRA layer of `model` through `forward`, and every DoRA layer through `dora_forward`;
    returns the undo."""
    linear = frozen_linear.linear if onednn else F.linear
    layers = [layer for _, layer in lora.lora_layers(model)]
    plain = {id(layer): layer.run for layer in layers}
    for layer in layers:
        layer.run = functools.partial(dora_forward if lora.is_dora(layer) else forward, linear=linear)

    def undo() -> None:
        for layer in layers:
            layer.run = plain[id(layer)]

    return undo
