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

from peftcli.models.gguf_header import GGUFCutShort, GGUFError, GGUFFile, TensorInfo, read_gguf
from peftcli.models.gguf_names import Rule, from_llamacpp_rotary, rotary_heads, to_hf_name
from peftcli.quant.blocks import unpack_nibbles

# ggml type ids (the gguf package's GGMLQuantizationType) this module dequantizes
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
BLOCK = 32  # values per block of the Q4_0, Q4_1 and Q8_0 types


# A llama file's metadata keys -> transformers' config fields: transformers' own GGUF table for the general,
# llama and tokenizer keys (transformers.integrations.ggml.GGUF_CONFIG_MAPPING, the entries it maps to a
# field; tests/models/test_gguf_load.py holds the two equal). Written out here so that reading a config
# imports no transformers (a second before `peft generate`'s first token).
CONFIG_KEYS = {
    "general.architecture": "model_type",
    "general.name": "_model_name_or_path",
    "llama.context_length": "max_position_embeddings",
    "llama.block_count": "num_hidden_layers",
    "llama.feed_forward_length": "intermediate_size",
    "llama.embedding_length": "hidden_size",
    "llama.rope.dimension_count": "head_dim",
    "llama.rope.freq_base": "rope_theta",
    "llama.attention.head_count": "num_attention_heads",
    "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "llama.vocab_size": "vocab_size",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}


def fast_gguf(path: str) -> GGUFFile | None:
    """The file's header when transformers would read it as a Llama (so `gguf_config` makes its config and
    filled.py its weights, as transformers would), else None. Raises GGUFCutShort for a file cut short."""
    try:
        gguf = read_gguf(path)
    except GGUFCutShort:
        raise  # no reader can load it: said as it is, not as another reader's puzzled error
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

    return LlamaConfig.from_dict(gguf_config_fields(gguf, path))


def gguf_config_fields(gguf: GGUFFile, path: str) -> dict:
    """The config fields (transformers' names) a llama file's metadata maps to (CONFIG_KEYS); no model_type
    (the caller's class says it)."""
    config: dict = {"tie_word_embeddings": gguf.tensor("output.weight") is None}
    for key, value in gguf.metadata.items():
        if key in CONFIG_KEYS:
            config[CONFIG_KEYS[key]] = value
    config.pop("model_type", None)
    if "vocab_size" not in config:  # transformers' fallback: the vocabulary's length
        tokens = read_gguf(path, arrays=True).metadata.get("tokenizer.ggml.tokens")
        if tokens:
            config["vocab_size"] = len(tokens)
    config["_name_or_path"] = path
    return config


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


def _q4_0(raw: Tensor) -> Tensor:
    """Blocks of 18 bytes: scale d (f16), 16 bytes of 4-bit q; x = d * (q - 8)."""
    blocks = raw.reshape(-1, 18)
    return unpack_nibbles(blocks[:, 2:]).sub_(8).mul_(_scales(blocks, 0))


def _q4_1(raw: Tensor) -> Tensor:
    """Blocks of 20 bytes: scale d, minimum m (f16 each), 16 bytes of 4-bit q; x = d * q + m."""
    blocks = raw.reshape(-1, 20)
    return unpack_nibbles(blocks[:, 4:]).mul_(_scales(blocks, 0)).add_(_scales(blocks, 2))


def _q8_0(raw: Tensor) -> Tensor:
    """Blocks of 34 bytes: scale d (f16), 32 int8 q; x = q * d."""
    blocks = raw.reshape(-1, 34)
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _scales(blocks, 0)


DEQUANTIZERS = {F32: _f32, F16: _f16, BF16: _bf16, Q4_0: _q4_0, Q4_1: _q4_1, Q8_0: _q8_0}
