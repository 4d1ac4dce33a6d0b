"""What a training run holds in memory for its weights, from shapes alone (no torch): `peft count`'s columns.

- frozen: every frozen tensor at ``model.dtype``; the linear layers ``model.quantize`` stores quantized at
  their format's bytes per weight (quant/formats.py, the same rule the loader follows: quant/convert.py); a
  GGUF file's packable blocks at their packed size (ggml.py);
- trained: each trainable parameter as an fp32 master copy, its gradient and AdamW's two moments, 16 bytes.

Activations come on top; they grow with batch size x sequence length and are not estimated here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peftcli.models.gguf_header import TensorInfo
from peftcli.models.gguf_names import to_hf_name
from peftcli.models.precision import Precision
from peftcli.models.shapes import Linear, Shapes
from peftcli.quant.formats import DTYPE_BYTES, FORMATS, PACKED_GGML, can_quantize, keeps_float

TRAINED_BYTES = 4 + 4 + 8  # fp32 weight, its gradient, AdamW's exp_avg and exp_avg_sq


@dataclass
class Inventory:
    """The frozen base as the estimate needs it: each tensor once, and which are linear layers' weights."""

    tensors: dict[str, int]  # tensor name -> elements, a tied tensor under its first name only
    linears: dict[str, Linear]  # module name -> shape
    output_head: str | None
    gguf_tensors: list[TensorInfo] = field(default_factory=list)


def inventory_of_shapes(shapes: Shapes) -> Inventory:
    tensors = {tensor: numel for _, (tensor, numel) in shapes.params.items()}
    return Inventory(tensors, dict(shapes.linears), shapes.output_head, list(shapes.gguf_tensors))


def frozen_bytes(inventory: Inventory, precision: Precision) -> int:
    """Bytes of the frozen base as `precision` loads it."""
    kind, dtype_bytes = precision.quantize, DTYPE_BYTES[precision.dtype]
    packed = {}
    if kind in ("gguf", "int8", "int4"):  # these keep a GGUF file's packable blocks (models/filled.py)
        for entry in inventory.gguf_tensors:
            found = to_hf_name("llama", entry.name)  # count models llama's GGUF files only (shapes.py)
            if found is not None and entry.ggml_type in PACKED_GGML:
                packed[found[0]] = math.prod(entry.shape) * PACKED_GGML[entry.ggml_type][1]
    total = 0.0
    for name, numel in inventory.tensors.items():
        module, _, leaf = name.rpartition(".")
        linear = inventory.linears.get(module)
        if name in packed:
            total += packed[name]
        elif (
            kind in FORMATS
            and leaf == "weight"
            and linear is not None
            and not linear.conv1d
            and not keeps_float(module, inventory.output_head)
            and can_quantize(linear.in_features, kind)
        ):
            total += numel * FORMATS[kind].bytes_per_weight
        else:
            total += numel * dtype_bytes
    return round(total)


def trained_bytes(trainable: int) -> int:
    return trainable * TRAINED_BYTES
