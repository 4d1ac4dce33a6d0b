"""`x @ W^T + b` for a frozen weight, through oneDNN on the CPU where it is faster than MKL.

PyTorch runs fp32 CPU products through MKL's sgemm. For the forward of a frozen layer, oneDNN's
matmul (the kernel behind torch.ops.mkldnn._linear_pointwise, which the CPU inductor backend uses) was
measured faster on this project's 2-core AMD machine: 1.18-1.46x on SmolLM2's gate/up projections
((1024, 576) @ (576, 1536)) and 1.48-1.50x on the output head's loss chunks ((256, 576) @ (576, 49152))
in two runs, equal within noise on the other shapes (scripts/bench_matmul.py). The backward needs only
the input gradient, `grad @ W`, which stays on MKL (faster there for the long inner dimensions it has).

Same math, not the same rounding: the two libraries sum in different orders (differences ~1e-6
relative in fp32). Anything else (a GPU, half precision, autocast, a weight that trains, oneDNN
missing) takes `F.linear`. `peftcli.fast.install(..., onednn=False)` keeps every product on MKL.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor


@cache
def _onednn():
    """oneDNN's linear op, or None when this torch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        if not torch.equal(op(x, w, None, "none", [], ""), F.linear(x, w)):
            return None
    except (AttributeError, RuntimeError):
        return None
    return op


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _onednn()(x, weight, bias, "none", [], "")


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        return grad_out @ weight if ctx.needs_input_grad[0] else None, None, None


def usable(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether the oneDNN path applies: CPU, fp32, 2-D input and weight, everything contiguous and on the
    same device, frozen weight and bias."""
    return (
        x.device.type == "cpu"
        and x.dim() == weight.dim() == 2
        and x.dtype == weight.dtype == torch.float32
        and x.is_contiguous()
        and weight.is_contiguous()
        and weight.device == x.device
        and not weight.requires_grad
        and (
            bias is None
            or (
                bias.dtype == torch.float32
                and bias.dim() == 1
                and bias.is_contiguous()
                and bias.device == x.device
                and not bias.requires_grad
            )
        )
        and not torch.is_autocast_enabled("cpu")
        and _onednn() is not None
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for a frozen weight (and bias); gradients flow to x only."""
    if not usable(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinear.apply(x, weight, bias)
    return _onednn_linear(x, weight, bias)
