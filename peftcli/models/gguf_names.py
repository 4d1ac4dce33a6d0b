"""A llama-architecture GGUF file's tensor names as transformers names them (no torch: `peft count` maps
them too). The facts are those of transformers' own GGUF loader (integrations/ggml.py)."""

from __future__ import annotations

import re

TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
IN_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """transformers' name for a GGUF tensor, or None for one the model has no place for (rope_freqs)."""
    layer = _LAYER.match(gguf_name)
    if layer:
        index, part, leaf = layer.groups()
        return f"model.layers.{index}.{IN_LAYER[part]}.{leaf}" if part in IN_LAYER else None
    base, _, leaf = gguf_name.rpartition(".")
    return f"{TOP_LEVEL[base]}.{leaf}" if base in TOP_LEVEL else None
