"""The frozen product every quantized layer shares: y = x W^T + b with W kept quantized.

    forward:   W = dequantize(codes) in x's dtype;   y = x W^T (+ b)
    backward:  dx = dy W   (W dequantized again)

Autograd keeps nothing for this product but a reference to the layer, whose codes exist anyway: no dense
copy of W outlives the call that needed it, and the input x is not kept (a frozen W needs no dx W^T term).
This is QLoRA's scheme (Dettmers et al. 2023, arXiv:2305.14314): the trainable parts beside the layer
(LoRA's factors ...) get their gradients through dx as through any frozen linear layer. The bias, where
there is one, is added outside the function, so a trainable bias (BitFit) gets its gradient as usual.

The dequantized weight is computed in float32 and rounded once to the product's dtype (bf16, fp16), so a
bf16 product sees the same weight whatever the format's own arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized; subclasses say how (`dequantize`).

    ``in_features``, ``out_features``, ``bias`` (an nn.Parameter or None) as on nn.Linear; ``compute_dtype``:
    the dtype of the dense weight a product uses when its input gives none (model.dtype).
    """

    in_features: int
    out_features: int
    format: str  # int8 | int4 | nf4 | a GGUF type name (Q4_1 ...)

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight, (out_features, in_features), in `dtype` (default: compute_dtype)."""
        weight = self.dequantize_float32()
        return weight.to(dtype or self.compute_dtype)

    def dequantize_float32(self) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = _FrozenProduct.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def stored_bytes(self) -> int:
        """Bytes of the stored weight (codes and scales; not the bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format}"
        )


def _product_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FrozenProduct(torch.autograd.Function):
    """x W^T for a QuantLinear's W; backward dequantizes W again for dx = dy W."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear) -> Tensor:
        ctx.layer = layer
        dtype = _product_dtype(x)
        return F.linear(x.to(dtype), layer.dequantize(dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None
