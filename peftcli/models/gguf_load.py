"""A llama-architecture GGUF file read as transformers holds it: its config from the header, its tensors
one at a time.

transformers' GGUF loader parses the whole file twice (once for the config, once for the weights) with
the gguf package's reader, whose per-item parse of a 49k-token vocabulary alone takes seconds, and
dequantizes in numpy. Here the header is read once (gguf_header.py: metadata and tensor table) and the
config made from the metadata by transformers' own key table (`gguf_config`); the loader
(models/filled.py) then reads each tensor's bytes (`read_rows`), packs the block types it keeps packed
(quant/ggml.py) and dequantizes the rest with torch (`dense`), after undoing llama.cpp's layout
(gguf_names.py: `to_transformers_layout`). With nothing kept packed the result equals transformers' load
tensor for tensor (tests/models/test_gguf_load.py pins it, the packaged SmolLM2 included).

Only what transformers would read as Llama is taken here (`fast_gguf`); anything else (another
architecture, a file transformers reads as Mistral) is configured by transformers.

Data is read with plain file reads (no memory map, whose touched pages would count in the process's RSS
for as long as the file stays mapped).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from peftcli.models.gguf_header import GGUFError, GGUFFile, TensorInfo, read_gguf
from peftcli.models.gguf_names import Rule, from_llamacpp_rotary, rotary_heads, to_hf_name

# ggml type ids (the gguf package's GGMLQuantizationType) this module dequantizes
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
BLOCK = 32  # values per block of the Q4_0, Q4_1 and Q8_0 types


def fast_gguf(path: str) -> GGUFFile | None:
    """The file's header when transformers would read it as a Llama (so `gguf_config` makes its config and
    filled.py its weights, as transformers would), else None."""
    try:
        gguf = read_gguf(path)
    except (GGUFError, OSError):
        return None
    name = gguf.metadata.get("general.name", "")
    if gguf.metadata.get("general.architecture") != "llama" or not isinstance(name, str):
        return None
    if "mistral" in name.lower():  # transformers reads a llama.cpp file so named as Mistral
        return None
    if any(
        key.split(".", 1)[0] not in ("general", "llama", "tokenizer", "quantize") for key in gguf.metadata
    ):
        return None  # keys of another architecture, which transformers would map too; or a split file
    if any(to_hf_name("llama", t.name) is None for t in gguf.tensors):
        return None
    return gguf


def gguf_config(gguf: GGUFFile, path: str):
    """The LlamaConfig transformers makes of the file's metadata (its own GGUF key table)."""
    from transformers import LlamaConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    config: dict = {"tie_word_embeddings": gguf.tensor("output.weight") is None}
    for key, value in gguf.metadata.items():
        prefix, _, rest = key.partition(".")
        table = GGUF_CONFIG_MAPPING.get(prefix, {})
        if rest in table and table[rest] not in (None, -1):
            config[table[rest]] = value
    config.pop("model_type", None)
    if "vocab_size" not in config:  # transformers' fallback: the vocabulary's length
        tokens = read_gguf(path, arrays=True).metadata.get("tokenizer.ggml.tokens")
        if tokens:
            config["vocab_size"] = len(tokens)
    config["_name_or_path"] = path
    return LlamaConfig.from_dict(config)


def read_rows(f, info: TensorInfo) -> Tensor:
    """The tensor's bytes as stored, (rows, bytes per row) uint8: a weight's (out, in) rows; a vector is
    one row. A block never crosses a row, so rows can be reordered before unpacking."""
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    f.seek(info.offset)
    if f.readinto(memoryview(raw.numpy())) != info.nbytes:
        raise GGUFError(f"{info.name}: the file ends inside its data")
    return raw.view(math.prod(info.shape[:-1]), -1)


def to_transformers_layout(tensor: Tensor, rule: Rule, heads: int, kv_heads: int) -> Tensor:
    """A llama q or k projection's rows (floats, or packed rows of bytes) from llama.cpp's rotary pairs
    back to transformers' halves (gguf_names.py); any other tensor as given."""
    n = rotary_heads(rule, heads, kv_heads)
    return tensor if n is None else from_llamacpp_rotary(tensor, n)


# --------------------------------------------------------------------------------------------------
# Dequantization, the same float operations as the gguf package's numpy code (bit-identical results)


def dequantize(blob: np.ndarray, info: TensorInfo) -> Tensor:
    """The tensor `info` describes, as float32 of its shape, from `blob`: the file's bytes (a memory map)."""
    return dense(torch.from_numpy(np.array(blob[info.offset : info.offset + info.nbytes])), info)


def dense(raw: Tensor, info: TensorInfo) -> Tensor:
    """A tensor's bytes (uint8, any shape: `read_rows`' rows, reordered or not) as float32 of its shape. A
    type without a torch dequantizer here goes through the gguf package's numpy one."""
    raw = raw.reshape(-1)
    if info.ggml_type not in DEQUANTIZERS:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        values = gguf_dequantize(raw.numpy(), GGMLQuantizationType(info.ggml_type))
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)
    return DEQUANTIZERS[info.ggml_type](raw).reshape(info.shape)


def _f32(raw: Tensor) -> Tensor:
    return raw.view(torch.float32)


def _f16(raw: Tensor) -> Tensor:
    return raw.view(torch.float16).float()


def _bf16(raw: Tensor) -> Tensor:
    return raw.view(torch.bfloat16).float()


def _scales(blocks: Tensor, start: int) -> Tensor:
    """The float16 at bytes [start, start + 2) of each block, as float32 (n_blocks, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: Tensor) -> Tensor:
    """(n_blocks, 16) bytes -> (n_blocks, 32) values 0..15: the low nibbles are the block's first half."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=1)


def _q4_0(raw: Tensor) -> Tensor:
    """Blocks of 18 bytes: scale d (f16), 16 bytes of 4-bit q; x = d * (q - 8)."""
    blocks = raw.reshape(-1, 18)
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return _scales(blocks, 0) * q.float()


def _q4_1(raw: Tensor) -> Tensor:
    """Blocks of 20 bytes: scale d, minimum m (f16 each), 16 bytes of 4-bit q; x = d * q + m."""
    blocks = raw.reshape(-1, 20)
    return _scales(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _scales(blocks, 2)


def _q8_0(raw: Tensor) -> Tensor:
    """Blocks of 34 bytes: scale d (f16), 32 int8 q; x = q * d."""
    blocks = raw.reshape(-1, 34)
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _scales(blocks, 0)


DEQUANTIZERS = {F32: _f32, F16: _f16, BF16: _bf16, Q4_0: _q4_0, Q4_1: _q4_1, Q8_0: _q8_0}
