"""NF4 weights through bitsandbytes: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, arXiv:2305.14314).

Each block of 64 consecutive weights (of the row-major (out, in) weight) is scaled by its absolute maximum
and rounded to the nearest of 16 levels placed at the quantiles of a normal distribution; the absmax stays
fp32 (no double quantization). bitsandbytes quantizes and dequantizes on CPU and CUDA alike; these are the
settings transformers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` uses, so a base
quantized here holds the same codes as one HF PEFT + transformers load, and adapters move between the two.

The product is QuantLinear's (product.py): dequantize with bitsandbytes, then a dense product.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
from torch import Tensor

from peftcli.errors import UserError
from peftcli.quant.blocks import as_bits
from peftcli.quant.product import QuantLinear

BLOCK = 64  # bitsandbytes' default block size, and transformers'


def check_available() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("model.quantize: nf4 needs bitsandbytes: pip install 'peftcli[quant]'")


def _functional():
    check_available()
    with warnings.catch_warnings():  # an optional kernels package it may miss does not matter here
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnb_functional
    return bnb_functional


class NF4Linear(QuantLinear):
    """y = x W^T + b with W stored as bitsandbytes NF4 codes and per-block absmax."""

    format = "nf4"

    def __init__(self, weight: Tensor, bias: Tensor | None, compute_dtype: torch.dtype):
        out_features, in_features = weight.shape
        if not bool(torch.isfinite(weight).all()):  # bitsandbytes would store NaN blocks without a word
            raise ValueError("its values are not finite (inf, NaN)")
        super().__init__(in_features, out_features, bias, compute_dtype)
        packed, state = _functional().quantize_4bit(
            weight.to(torch.float32).contiguous(),
            blocksize=BLOCK,
            compress_statistics=False,
            quant_type="nf4",
        )
        self.register_buffer("packed", packed)  # ((out * in + 1) // 2, 1) uint8: two codes per byte
        # fp32 absmax per block and the 16 NF4 levels, as their bits (int32): `model.to(dtype)` leaves them
        self.register_buffer("absmax_bits", as_bits(state.absmax.float()))
        self.register_buffer("level_bits", as_bits(state.code.float()))

    def dequantize_float32(self) -> Tensor:
        functional = _functional()
        state = functional.QuantState(
            absmax=self.absmax_bits.view(torch.float32),
            shape=torch.Size((self.out_features, self.in_features)),
            code=self.level_bits.view(torch.float32),
            blocksize=BLOCK,
            quant_type="nf4",
            dtype=torch.float32,
        )
        return functional.dequantize_4bit(self.packed, state)

    def stored_bytes(self) -> int:
        """Codes and absmax (the 16 levels are shared in spirit: not counted)."""
        return self.packed.numel() + self.absmax_bits.numel() * 4
