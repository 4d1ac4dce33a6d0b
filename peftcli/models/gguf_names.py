"""llama.cpp's names and layouts for the tensors of the architectures peftcli writes and reads as GGUF.

One table per llama.cpp architecture maps a transformers parameter name to llama.cpp's (both ways), with
what changes on the way:

- **Rotary pairs** (llama): transformers' Llama rotates each head's first half against its second half
  (``rotate_half``); llama.cpp's "llama" architecture rotates adjacent pairs (2j, 2j+1). Its q and k
  projections' output rows are therefore reordered per head: row ``a * d/2 + j`` of a head of size d goes
  to row ``2j + a`` (`to_llamacpp_rotary`). The attention scores are unchanged, since q and k move alike.
  Qwen2 is read by llama.cpp with the half-split ("NEOX") rotation and needs nothing.
- **Transposed weights** (GPT-2): its ``Conv1D`` layers store (in, out); llama.cpp's (out, in).

Shapes here are row-major (numpy/torch order), the reverse of ggml's ``ne``. Nothing here imports torch:
the functions work on numpy arrays and torch tensors alike.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from peftcli.errors import UserError


@dataclass(frozen=True)
class Rule:
    hf: str  # transformers' name, "{i}" for the layer index
    gguf: str  # llama.cpp's
    rotary: str | None = None  # "heads" | "kv_heads": rows reordered for llama.cpp's rotary pairs
    transposed: bool = False  # stored (in, out) by transformers (GPT-2's Conv1D)


def _llama_like(rotary: bool, biases: tuple[str, ...]) -> list[Rule]:
    layer = "model.layers.{i}."
    rules = [
        Rule("model.embed_tokens.weight", "token_embd.weight"),
        Rule("model.norm.weight", "output_norm.weight"),
    ]
    rules.append(Rule("lm_head.weight", "output.weight"))
    projections = {
        "self_attn.q_proj": ("attn_q", "heads"),
        "self_attn.k_proj": ("attn_k", "kv_heads"),
        "self_attn.v_proj": ("attn_v", None),
        "self_attn.o_proj": ("attn_output", None),
        "mlp.gate_proj": ("ffn_gate", None),
        "mlp.up_proj": ("ffn_up", None),
        "mlp.down_proj": ("ffn_down", None),
    }
    for hf, (gguf, heads) in projections.items():
        rules.append(Rule(f"{layer}{hf}.weight", f"blk.{{i}}.{gguf}.weight", heads if rotary else None))
        if hf.rsplit(".", 1)[-1] in biases:
            rules.append(Rule(f"{layer}{hf}.bias", f"blk.{{i}}.{gguf}.bias", heads if rotary else None))
    rules.append(Rule(f"{layer}input_layernorm.weight", "blk.{i}.attn_norm.weight"))
    rules.append(Rule(f"{layer}post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"))
    return rules


def _gpt2() -> list[Rule]:
    rules = [
        Rule("transformer.wte.weight", "token_embd.weight"),
        Rule("transformer.wpe.weight", "position_embd.weight"),
        Rule("lm_head.weight", "output.weight"),
    ]
    parts = {
        "ln_1": ("attn_norm", False),
        "attn.c_attn": ("attn_qkv", True),
        "attn.c_proj": ("attn_output", True),
        "ln_2": ("ffn_norm", False),
        "mlp.c_fc": ("ffn_up", True),
        "mlp.c_proj": ("ffn_down", True),
    }
    for hf, (gguf, conv1d) in parts.items():
        rules.append(Rule(f"transformer.h.{{i}}.{hf}.weight", f"blk.{{i}}.{gguf}.weight", transposed=conv1d))
        rules.append(Rule(f"transformer.h.{{i}}.{hf}.bias", f"blk.{{i}}.{gguf}.bias"))
    rules += [
        Rule("transformer.ln_f.weight", "output_norm.weight"),
        Rule("transformer.ln_f.bias", "output_norm.bias"),
    ]
    return rules


# llama.cpp architecture -> its rules. Llama's optional biases: attention_bias puts one on q, k, v and o.
TENSOR_RULES: dict[str, list[Rule]] = {
    "llama": _llama_like(rotary=True, biases=("q_proj", "k_proj", "v_proj", "o_proj")),
    "qwen2": _llama_like(rotary=False, biases=("q_proj", "k_proj", "v_proj")),
    "gpt2": _gpt2(),
}

# transformers model_type -> llama.cpp architecture (llama.cpp reads Mistral as llama)
LLAMACPP_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}


@functools.cache
def _compiled(arch: str, side: str) -> list[tuple[re.Pattern, Rule]]:
    out = []
    for rule in TENSOR_RULES[arch]:
        template = getattr(rule, side)
        out.append((re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$"), rule))
    return out


def _translate(arch: str, name: str, side: str) -> tuple[str, Rule] | None:
    other = "gguf" if side == "hf" else "hf"
    for pattern, rule in _compiled(arch, side):
        match = pattern.match(name)
        if match:
            target = getattr(rule, other)
            return (target.replace("{i}", match.group(1)) if match.groups() else target), rule
    return None


def to_gguf_name(arch: str, hf_name: str) -> tuple[str, Rule]:
    """llama.cpp's name of a transformers parameter (and the rule that maps it); UserError if none."""
    found = _translate(arch, hf_name, "hf")
    if found is None:
        raise UserError(
            f"export: no llama.cpp {arch} tensor holds `{hf_name}`: this model has parts llama.cpp lacks"
        )
    return found


def to_hf_name(arch: str, gguf_name: str) -> tuple[str, Rule] | None:
    """The transformers name of a llama.cpp tensor, or None when the table has no such tensor."""
    return _translate(arch, gguf_name, "gguf")


def rotary_heads(rule: Rule, heads: int, kv_heads: int) -> int | None:
    """The head count a rule's rotary reordering works in, or None when the rule reorders nothing."""
    if rule.rotary is None:
        return None
    return heads if rule.rotary == "heads" else kv_heads


def to_llamacpp_rotary(rows, heads: int):
    """Reorder the output rows of a q or k projection (weight (out, in), bias (out,) or LoRA B (out, r)) from
    transformers' half-split rotary layout to llama.cpp's adjacent pairs: within each head of size d, row
    a * d/2 + j goes to 2j + a."""
    out = rows.shape[0]
    head_dim = out // heads
    return rows.reshape(heads, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def from_llamacpp_rotary(rows, heads: int):
    """The inverse of `to_llamacpp_rotary`: llama.cpp's pairs back to transformers' halves."""
    out = rows.shape[0]
    head_dim = out // heads
    return rows.reshape(heads, head_dim // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
