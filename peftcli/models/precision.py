"""Which dtype and which weight storage a model is loaded with, and why: `model.dtype` and `model.quantize`.

No torch at import time: `peft count` resolves these too (for its memory column) without importing it.

``model.dtype: auto`` is bf16 where the hardware computes bf16 products natively and fast (a CUDA device that
supports bf16; a CPU with AVX512_BF16 or AMX, read from /proc/cpuinfo at run time), else float32: a CPU
without them runs bf16 products through conversions, several times slower than fp32 (measured here, on an
AVX2-only machine: 3.4 against 15.8 GFLOP/s for a (1024, 576) x (576, 1536) product). ``PEFTCLI_BF16=1`` or
``=0`` overrides the detection (the tests pin it to 0 so that they compute the same on every machine).

``model.quantize: auto`` keeps a GGUF file's own precision (its packable block types stay packed,
quant/ggml.py) and means ``none`` for any other source.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    dtype: str  # float32 | bfloat16 | float16
    dtype_reason: str
    quantize: str  # none | int8 | int4 | nf4 | gguf (the file's own blocks)
    quantize_reason: str

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self, model) -> dict:
        """report.json's `precision` for the loaded `model`: the dtype and storage with the reasons, the
        formats of its quantized layers, what its frozen weights occupy, and the dtype of what trains (fp32
        master copies: train/loop.upcast_trainable)."""
        from peftcli.quant import convert

        trained = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
        return {
            **self.to_dict(),
            "quantized_layers": convert.describe(model),
            "frozen_bytes": convert.frozen_bytes(model),
            "trainable_dtype": ", ".join(trained),
        }

    def describe(self) -> str:
        """One line: 'bfloat16 (auto: this CPU has avx512_bf16); weights: int4 (recipe)'."""
        weights = "as dtype" if self.quantize == "none" else self.quantize
        return f"{self.dtype} ({self.dtype_reason}); frozen weights: {weights} ({self.quantize_reason})"


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def fast_bf16(probe_cuda: bool = True) -> str | None:
    """Why bf16 products are fast on this machine, or None. `probe_cuda=False` (peft count: no torch) takes an
    NVIDIA driver's presence for a bf16-capable GPU."""
    forced = os.environ.get("PEFTCLI_BF16")
    if forced in ("0", "1"):
        return "PEFTCLI_BF16=1" if forced == "1" else None
    if probe_cuda:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return f"CUDA device {torch.cuda.get_device_name()} computes bf16"
    elif Path("/proc/driver/nvidia/version").is_file():
        return "an NVIDIA driver is present (taken as a bf16 GPU)"
    found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
    return f"this CPU has {found[0]}" if found else None


def resolve(dtype: str, quantize: str, gguf: bool, probe_cuda: bool = True) -> Precision:
    """The recipe's `dtype` and `quantize` (either may be auto) for a source that is (not) a GGUF file."""
    if dtype == "auto":
        why = fast_bf16(probe_cuda)
        dtype, dtype_reason = (
            ("bfloat16", f"auto: {why}")
            if why
            else ("float32", "auto: no native bf16 here (AVX512_BF16, AMX or a bf16 GPU), so fp32 is faster")
        )
    else:
        dtype_reason = "model.dtype"
    if quantize == "auto":
        quantize, quantize_reason = (
            ("gguf", "auto: a GGUF file keeps its own blocks") if gguf else ("none", "auto: not a GGUF file")
        )
    else:
        quantize_reason = "model.quantize"
    return Precision(dtype, dtype_reason, quantize, quantize_reason)
