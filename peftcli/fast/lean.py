"""Activation-lean forms of two Llama-family layers for training: same math, less kept for backward.

SwiGLU MLP, ``down(silu(gate(x)) * up(x))``. Plain autograd keeps four (tokens, intermediate) tensors per
layer until backward: gate's output (for silu's backward), silu's output and up's output (for the
product's backward), and the product itself (the input LoRA's A factor on ``down`` needs for its
gradient). Here one autograd function runs ``silu * up -> down`` and keeps only gate's and up's outputs;
backward recomputes the two cheap elementwise products from them:

    forward:   h = silu(g) * u;   y = h W^T + b + s (h A^T) B^T
    backward:  dB = s dy^T (h A^T);   da = s dy B;   dA = da^T h;   dh = dy W + da A
               du = dh * silu(g);     dg = silu'(g) * (dh * u)

RMSNorm, ``y = w * x * r`` with ``r = rsqrt(mean(x^2) + eps)``. Plain autograd keeps its input x; the
output y is kept anyway by the LoRA factors (or adapters) of the projections it feeds. Here backward
rebuilds the normalised input from the output, ``x * r = y / w``, so only y and r are kept:

    dx = r * (g - (x r) * mean(g * x r)),   g = dy * w

On SmolLM2-135M (30 layers, hidden 576, intermediate 1536) at batch 4 x 256 in fp32 that is 16.5 MiB
less per layer, ~500 MiB per step, for a few elementwise passes in backward (scripts/bench_train.py).
With `train.gradient_checkpointing: up` (which `auto`, the default, picks) the MLP keeps gate's output
only and backward runs up's projection again on the MLP's input, which the lean norm (and LoRA's A
factors) keep anyway: 6 MiB less per layer there for one more (tokens, hidden) x (hidden, inter) product.
Each falls back to the module's own forward where it cannot apply (see enable_lean_layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from peftcli.methods import lora
from peftcli.methods.modules import AdaptedLayer
from peftcli.quant.convert import is_quantized

# transformers classes whose forward is exactly the math above in fp32 (read in transformers 5)
SWIGLU_MLPS = {
    "LlamaMLP",
    "MistralMLP",
    "Qwen2MLP",
    "Qwen3MLP",
    "OlmoMLP",
    "Olmo2MLP",
    "SmolLM3MLP",
    "GraniteMLP",
}
RMS_NORMS = {
    "LlamaRMSNorm",
    "MistralRMSNorm",
    "Qwen2RMSNorm",
    "Qwen3RMSNorm",
    "Olmo2RMSNorm",
    "SmolLM3RMSNorm",
    "GraniteRMSNorm",
}


class _SiluMulDown(torch.autograd.Function):
    """down(silu(gate) * up) on (tokens, intermediate) inputs.

    Keeps gate and up when they need gradients (the product is recomputed from them), else only the
    product, and that only for LoRA's A factor (e.g. the first layer of a model with LoRA on down_proj
    alone, whose gate and up see no trainable input). Given the MLP's input `x` and `up_proj` (a module
    whose forward repeats exactly), keeps x instead of up and runs ``up_proj(x)`` again in backward.
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scale, x=None, up_proj=None):
        # A quantized down_proj (`weight` is the layer) is dequantized here and again in backward.
        ctx.quantized = weight if is_quantized(weight) else None
        hidden = F.silu(gate).mul_(up)  # (tokens, inter)
        out = F.linear(hidden, _dense(weight, hidden.dtype), bias)  # (tokens, out)
        weight = None if ctx.quantized is not None else weight
        down = None
        if lora_a is not None:
            down = hidden @ lora_a.t()  # (tokens, r)
            out.addmm_(down, lora_b.t(), alpha=scale)
        ctx.scale = scale
        ctx.through = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.up_proj = up_proj if ctx.through else None
        if ctx.up_proj is not None:  # up is recomputed from the MLP's input, the lean norm's kept output
            ctx.save_for_backward(gate, x, weight, lora_a, lora_b, down)
        elif ctx.through:
            ctx.save_for_backward(gate, up, weight, lora_a, lora_b, down)
        else:
            ctx.save_for_backward(hidden if lora_a is not None else None, weight, lora_a, lora_b, down)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.through:
            gate, up_or_x, weight, lora_a, lora_b, down = ctx.saved_tensors
            if ctx.up_proj is None:
                up = up_or_x
            else:
                with torch.no_grad():  # the forward's own code on the same input: the same values
                    up = ctx.up_proj(up_or_x).reshape(gate.shape)
            act = F.silu(gate)
        else:
            hidden, weight, lora_a, lora_b, down = ctx.saved_tensors
        grad_a = grad_b = grad_gate = grad_up = None
        if ctx.quantized is not None and ctx.through:
            weight = ctx.quantized.dequantize(grad_out.dtype)
        grad_hidden = grad_out @ weight if ctx.through else None  # (tokens, inter)
        if lora_a is not None:
            grad_down = (grad_out @ lora_b).mul_(ctx.scale)  # (tokens, r)
            if ctx.needs_input_grad[5]:
                grad_b = (grad_out.t() @ down).mul_(ctx.scale)  # (out, r)
            if ctx.needs_input_grad[4]:
                grad_a = grad_down.t() @ (act * up if ctx.through else hidden)  # (r, inter)
            if ctx.through:
                grad_hidden.addmm_(grad_down, lora_a)
        if ctx.needs_input_grad[1]:
            grad_up = grad_hidden * act
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad_hidden.mul_(up), gate)
        return grad_gate, grad_up, None, None, grad_a, grad_b, None, None, None


def _recomputed_forward(mlp: nn.Module, x: Tensor) -> Tensor:
    """The lean MLP, its own activations dropped after forward and recomputed in backward: only its input
    is kept, which the RMSNorm before it keeps anyway (costs gate's and up's products once more)."""
    if not torch.is_grad_enabled():
        return _lean_forward(mlp, x)
    return torch.utils.checkpoint.checkpoint(_lean_forward, mlp, x, use_reentrant=False)


def _dense(weight, dtype: torch.dtype) -> Tensor:
    """A weight tensor as it is, a quantized layer's weight dequantized."""
    return weight.dequantize(dtype) if is_quantized(weight) else weight


def _frozen_parts(proj: nn.Module):
    """(weight, bias, lora_A, lora_B, scale) of a frozen Linear or a dropout-free plain LoRA layer (not
    DoRA, whose magnitude rescales the output), else None. For a quantized layer (peftcli/quant) the
    `weight` is the layer itself."""
    lora_a = lora_b = None
    scale = 0.0
    if isinstance(proj, AdaptedLayer) and proj.method == lora.NAME:
        if proj.dropout is not None or proj.fan_in_fan_out or lora.is_dora(proj):
            return None
        lora_a, lora_b, scale = proj.lora_A.weight, proj.lora_B.weight, proj.scale
        proj = proj.base
    if (type(proj) is not nn.Linear and not is_quantized(proj)) or any(
        p.requires_grad for p in proj.parameters()
    ):
        return None
    return (proj if is_quantized(proj) else proj.weight), proj.bias, lora_a, lora_b, scale


def _lean_forward(mlp: nn.Module, x: Tensor, recompute_up: bool = False) -> Tensor:
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    parts = _frozen_parts(mlp.down_proj)
    usable = (
        parts is not None
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x.device.type)
        and all(t is None or _dtype(t) == gate.dtype for t in parts[:4])
    )
    if not usable:  # the module's own math
        return mlp.down_proj(mlp.act_fn(gate) * up)
    inter = gate.shape[-1]
    # up's forward runs again in backward only where it repeats exactly: no dropout, frozen base
    up_proj = mlp.up_proj if recompute_up and _frozen_parts(mlp.up_proj) is not None else None
    out = _SiluMulDown.apply(gate.reshape(-1, inter), up.reshape(-1, inter), *parts, x, up_proj)
    return out.view(*gate.shape[:-1], out.shape[-1])


def _dtype(weight) -> torch.dtype:
    return weight.compute_dtype if is_quantized(weight) else weight.dtype


def _up_recomputed_forward(mlp: nn.Module, x: Tensor) -> Tensor:
    """The lean MLP keeping gate's output only; backward runs up's projection again on the MLP's input."""
    return _lean_forward(mlp, x, recompute_up=True)


# enable_lean_layers' `recompute` -> the MLP forward it installs
_MLP_FORWARDS = {None: _lean_forward, "up": _up_recomputed_forward, "mlp": _recomputed_forward}


class _RMSNorm(torch.autograd.Function):
    """w * (x * rsqrt(mean(x^2) + eps)) over the last dim; keeps the output and rsqrt, not x."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        # mean(x^2) as a dot product and the scaling in place: no (tokens, hidden) temporaries besides
        # the output, which keeps glibc's heap ~60 MiB smaller at the step's peak on SmolLM2-135M
        rstd = torch.linalg.vecdot(x, x).unsqueeze(-1).div_(x.shape[-1]).add_(eps).rsqrt_()  # (..., 1)
        out = (x * rstd).mul_(weight)
        ctx.save_for_backward(out, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out, rstd, weight = ctx.saved_tensors
        normed = out / weight  # x * rstd
        grad = grad_out * weight
        mean = torch.linalg.vecdot(grad, normed, dim=-1).unsqueeze(-1).div_(normed.shape[-1])
        return grad.sub_(normed.mul_(mean)).mul_(rstd), None, None


def _lean_norm_forward(norm: nn.Module, x: Tensor) -> Tensor:
    weight = norm.weight
    if (
        torch.is_grad_enabled()
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled(x.device.type)
    ):
        return _RMSNorm.apply(x, weight, norm.variance_epsilon)
    return type(norm).forward(norm, x)


def is_swiglu(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return type(module).__name__ in SWIGLU_MLPS and silu


def is_rms_norm(module: nn.Module) -> bool:
    """One of the RMSNorms above, frozen, with a weight that can be divided by (no zero, no subnormal)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ in RMS_NORMS
        and isinstance(weight, Tensor)
        and not weight.requires_grad
        and weight.device.type != "meta"
        and bool(weight.abs().min() >= torch.finfo(weight.dtype).tiny)
    )


def enable_lean_layers(model: nn.Module, recompute: str | None = None) -> tuple[int, int]:
    """Route the SwiGLU MLPs and RMSNorms of `model` through the lean forms; returns (MLPs, norms) routed.

    `recompute` trades time for memory in backward: "up" runs up's projection again instead of keeping
    its output (see _up_recomputed_forward), "mlp" the whole MLP (see _recomputed_forward).
    Per call a lean form falls back to the module's own forward where it cannot apply: no gradient
    being recorded, autocast on, half precision (the norm), a trainable or dropout-wrapped ``down_proj``
    or mixed dtypes (the MLP). Undo with disable_lean_layers.
    """
    mlp_forward = _MLP_FORWARDS[recompute]
    mlps = norms = 0
    for module in model.modules():
        if is_swiglu(module):
            module.forward = mlp_forward.__get__(module)  # an instance attribute shadows the class's
            mlps += 1
        elif is_rms_norm(module):
            module.forward = _lean_norm_forward.__get__(module)
            norms += 1
    return mlps, norms


def disable_lean_layers(model: nn.Module) -> None:
    lean = (*_MLP_FORWARDS.values(), _lean_norm_forward)
    for module in model.modules():
        if getattr(vars(module).get("forward"), "__func__", None) in lean:
            del module.forward
