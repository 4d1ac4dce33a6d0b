"""LoRA's forward for training, same math as methods/lora.py's `run` with fewer full-size tensors.

    out = W x + b;   out += scale * (x A^T) B^T     on (tokens, in) rows, in place

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


def forward(layer: AdaptedLayer, x: Tensor, linear: Callable = frozen_linear.linear) -> Tensor:
    """x: (..., in) -> (..., out), as lora.run computes it."""
    shape = (*x.shape[:-1], layer.out_features)
    x = x.reshape(-1, layer.in_features)  # (tokens, in): 2-D products, and an output that is no view
    out = _base_forward(layer, x, linear)  # (tokens, out)
    lora_a, lora_b = layer.lora_A.weight, layer.lora_B.weight
    h = x if layer.dropout is None else layer.dropout(x)
    # A frozen half-precision base with fp32 factors; autocast does this cast itself when on.
    if h.dtype != lora_a.dtype and not torch.is_autocast_enabled(h.device.type):
        h = h.to(lora_a.dtype)
    down = F.linear(h, lora_a)  # (tokens, in) @ (in, r) -> (tokens, r): the only product with x
    # The in-place add needs one dtype: the base output's (bf16 under autocast, fp32 factors or not).
    down, lora_b = down.to(out.dtype), lora_b.to(out.dtype)  # no-ops when they already agree
    if out._base is not None or not out.is_contiguous():
        out = out + layer.scale * F.linear(down, lora_b)
    else:
        # out += scale * down @ B^T in one fused kernel; on a view it would copy the gradient instead.
        out.addmm_(down, lora_b.t(), alpha=layer.scale)
    return out.view(shape)


def _base_forward(layer: AdaptedLayer, x: Tensor, linear: Callable) -> Tensor:
    """The frozen layer on (tokens, in)."""
    if layer.fan_in_fan_out:  # Conv1D's own forward returns a view; its math, y = b + x @ W, directly
        return torch.addmm(layer.base.bias, x, layer.base.weight)
    if type(layer.base) is nn.Linear:
        return linear(x, layer.base.weight, layer.base.bias)
    return layer.base(x)


def install(model: nn.Module, onednn: bool = True) -> Callable[[], None]:
    """Route every LoRA layer of `model` through `forward`; returns the undo."""
    linear = frozen_linear.linear if onednn else F.linear
    layers = [layer for _, layer in lora.lora_layers(model)]
    for layer in layers:
        layer.run = functools.partial(forward, linear=linear)

    def undo() -> None:
        for layer in layers:
            layer.run = lora.run

    return undo
