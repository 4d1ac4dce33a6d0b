"""What each storage format of a frozen weight costs, in plain numbers: no torch (`peft count` reads this).

``model.quantize``: ``none`` keeps the weights at ``model.dtype``; ``int8`` / ``int4`` / ``nf4`` store every
frozen linear layer of the transformer blocks quantized (embeddings, the output head and classification heads
stay at ``model.dtype``, as in QLoRA); ``auto`` keeps a GGUF file's own precision and is ``none`` for anything
else.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANTIZE_CHOICES = ("auto", "none", "int8", "int4", "nf4")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Modules that stay unquantized whatever `quantize` says: the heads sequence classification trains in full
# (methods/layout.py reads this list too) and the model's output head.
CLASSIFIER_HEADS = ("classifier", "score")


@dataclass(frozen=True)
class Format:
    name: str
    bytes_per_weight: float  # codes and scales together
    description: str


FORMATS = {
    "int8": Format("int8", 34 / 32, "8-bit codes in blocks of 32, an fp16 scale each (GGUF Q8_0's layout)"),
    "int4": Format(
        "int4", 20 / 32, "4-bit codes in blocks of 32, an fp16 scale and minimum each (GGUF Q4_1's layout)"
    ),
    "nf4": Format(
        "nf4", 0.5 + 4 / 64, "bitsandbytes NF4: 4-bit normal-float codes in blocks of 64, an fp32 absmax each"
    ),
}

# GGUF tensor types (ggml type ids) kept packed by ggml.py, and the bytes per weight of the packed form:
# the file's own for Q4_0, Q4_1 and Q8_0; wider codes or scales for the others, still far below fp32.
PACKED_GGML: dict[int, tuple[str, float]] = {
    2: ("Q4_0", 18 / 32),
    3: ("Q4_1", 20 / 32),
    6: ("Q5_0", 34 / 32),  # int8 codes (q - 16), fp16 scale per 32
    8: ("Q8_0", 34 / 32),
    12: ("Q4_K", 0.5 + 8 / 32),  # 4-bit codes, fp32 scale and minimum per 32
    14: ("Q6_K", 1 + 4 / 16),  # int8 codes (q - 32), fp32 scale per 16
}


BLOCK = 32  # weights per block of int8 and int4


def can_quantize(in_features: int, kind: str) -> bool:
    """int8 and int4 cut each row into whole blocks of 32 inputs; nf4 (bitsandbytes) takes any shape."""
    return kind == "nf4" or (kind in ("int8", "int4") and in_features % BLOCK == 0)


def keeps_float(name: str, output_head: str | None) -> bool:
    """Whether the linear layer `name` stays unquantized: the output head or a classification head."""
    first = name.split(".", 1)[0]
    return name == output_head or first in CLASSIFIER_HEADS


def linear_bytes(quantize: str, numel: int, dtype: str) -> float:
    """Bytes of a frozen linear weight of `numel` elements stored as `quantize` (none: at `dtype`)."""
    if quantize in FORMATS:
        return numel * FORMATS[quantize].bytes_per_weight
    return numel * DTYPE_BYTES[dtype]
