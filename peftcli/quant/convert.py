"""Linear layers to quantized ones and back, and what a model's frozen weights occupy.

`quantize_linear` is what the loader applies to each frozen linear layer as its weight arrives (and, for a
model that was loaded whole, `quantize_model` to each in place); `dequantize_model` gives back a plain
transformers model with dense weights (the merge's starting point: the weights the adapter was trained
against, not a re-read original). `dense_weight` is a linear layer's weight as a tensor, whatever its storage.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peftcli.errors import UserError
from peftcli.lazy import is_conv1d
from peftcli.quant import blocks, nf4
from peftcli.quant.formats import can_quantize, keeps_float
from peftcli.quant.product import QuantLinear

_BITS = {"int8": 8, "int4": 4}


def is_quantized(module: nn.Module) -> bool:
    """A frozen linear layer whose weight is stored quantized (any format here)."""
    return isinstance(module, QuantLinear)


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """The (out, in) weight of a linear layer, dequantized if it is stored quantized."""
    if is_quantized(module):
        return module.dequantize(dtype)
    return module.weight if dtype is None else module.weight.to(dtype)


def quantize_linear(
    weight: Tensor, bias: Tensor | None, kind: str, compute_dtype: torch.dtype, name: str = "weight"
) -> QuantLinear:
    """A QuantLinear of `kind` (int8 | int4 | nf4) holding `weight` (out, in); `name` (the weight's key)
    names it in the one-line error for a weight the format cannot hold (beyond fp16's range, NaN, inf)."""
    try:
        if kind == "nf4":
            return nf4.NF4Linear(weight, bias, compute_dtype)
        return blocks.BlockLinear(blocks.quantize(weight, _BITS[kind]), bias, compute_dtype, kind)
    except ValueError as e:
        raise UserError(f"model.quantize: {kind} cannot hold `{name}`: {e}") from e


def quantize_targets(model: nn.Module, kind: str) -> list[str]:
    """Names of the linear layers `kind` quantizes: every nn.Linear but the output head and classification
    heads, where the format can hold its shape (formats.keeps_float, can_quantize)."""
    return [name for name, module in _frozen_linears(model) if can_quantize(module.in_features, kind)]


def left_unquantized(model: nn.Module) -> list[str]:
    """Linear layers (heads aside) that a loaded model holds unquantized: a shape the format cannot hold,
    or a kind of layer the formats do not take (GPT-2's Conv1D)."""
    return [name for name, _ in _frozen_linears(model, plain_only=False)]


def _frozen_linears(model: nn.Module, plain_only: bool = True) -> list[tuple[str, nn.Module]]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    return [
        (name, module)
        for name, module in model.named_modules()
        if (type(module) is nn.Linear or not plain_only and is_conv1d(module))
        and not keeps_float(name, head_name)
    ]


def quantize_model(model: nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Replace every target linear layer of a loaded model by its quantized form, one at a time; returns how
    many."""
    names = quantize_targets(model, kind)
    for name in names:
        linear = model.get_submodule(name)
        set_submodule(
            model,
            name,
            quantize_linear(linear.weight.data, _data(linear.bias), kind, compute_dtype, f"{name}.weight"),
        )
        del linear
    return len(names)


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every quantized linear layer and embedding becomes its dense nn.Linear / nn.Embedding (in `dtype`);
    a head that shares its blocks with the embedding (a GGUF file's tied head) shares the dense weight."""
    dense: dict[int, nn.Parameter] = {}  # id(Blocks) -> its dense weight, for tied heads
    for name, module in list(model.named_modules()):
        if isinstance(module, blocks.BlockEmbedding):
            weight = _shared(dense, module.blocks, dtype)
            embedding = nn.Embedding(*weight.shape, padding_idx=module.padding_idx, device="meta")
            embedding.weight = weight  # the very Parameter a tied head gets: still tied, as the config says
            set_submodule(model, name, embedding)
        elif is_quantized(module):
            shared = getattr(module, "blocks", None)
            weight = _shared(dense, shared, dtype) if shared is not None else module.dequantize(dtype)
            linear = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device="meta"
            )
            linear.weight = (
                weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
            )
            if module.bias is not None:
                linear.bias = nn.Parameter(
                    module.bias.data.to(dtype), requires_grad=module.bias.requires_grad
                )
            set_submodule(model, name, linear)
    return model


def _shared(dense: dict, owner: blocks.Blocks, dtype: torch.dtype) -> nn.Parameter:
    if id(owner) not in dense:
        dense[id(owner)] = nn.Parameter(owner.dequantize().to(dtype), requires_grad=False)
    return dense[id(owner)]


def frozen_bytes(model: nn.Module) -> int:
    """Bytes the frozen weights occupy: quantized storage, plus every frozen float tensor, each once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.buffers(), *(p for p in model.parameters() if not p.requires_grad)]:
        if tensor.device.type == "meta" or tensor.untyped_storage().data_ptr() in seen:
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        total += tensor.untyped_storage().nbytes()
    return total


def quantized_numel(model: nn.Module) -> int:
    """The weights `model`'s quantized layers and embeddings stand for (out x in each), a weight shared by
    two of them (a GGUF file's tied head and embedding) once: what parameter counts count for them."""
    owners: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, (blocks.BlockEmbedding, blocks.BlockLinear)):
            owners[id(module.blocks)] = module.blocks.rows * module.blocks.columns
        elif is_quantized(module):
            owners[id(module)] = module.in_features * module.out_features
    return sum(owners.values())


def describe(model: nn.Module) -> dict[str, int]:
    """How many layers each storage format holds: {"Q4_1": 210, "int4": 3, ...}."""
    formats: dict[str, int] = {}
    for module in model.modules():
        fmt = getattr(module, "format", None)
        if is_quantized(module) or isinstance(module, blocks.BlockEmbedding):
            formats[fmt] = formats.get(fmt, 0) + 1
    return formats


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _data(bias: nn.Parameter | None) -> Tensor | None:
    return None if bias is None else bias.data
