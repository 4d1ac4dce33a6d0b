"""A Llama decoder in plain torch, for `peft generate` and `peft chat`: the same math as transformers'
LlamaForCausalLM (Touvron et al. 2023, arXiv:2302.13971), without importing transformers' modeling code.

Importing transformers' Llama modules (its config and modeling code pull in torch.distributed.tensor and
walk every model's directory) takes seconds before the first token; this module takes none of it. Each of
the model's layers:

    h = x + o_proj(attention(rotary(q_proj(n)), rotary(k_proj(n)), v_proj(n))),   n = rms_norm(x)
    out = h + down_proj(silu(gate_proj(m)) * up_proj(m)),                          m = rms_norm(h)

with grouped-query attention (num_key_value_heads <= num_attention_heads), rotary position embeddings on
halves of each head (theta ** (-2i / head_dim)), and logits = lm_head(rms_norm(out)), the head tied to
the embedding where the config says so. Keys and values are cached, so each new token costs one position.

Its modules carry transformers' names (``model.layers.N.self_attn.q_proj``, ``lm_head``), so the checkpoint
loader (models/filled.py) fills it as it fills transformers' model, and every method's inject and merge
apply to it unchanged. Only what this math covers is taken (`spec_of`: no rope scaling, no biases, SiLU);
anything else is decoded by transformers.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from peftcli.models.gguf_header import GGUFFile

log = logging.getLogger(__name__)

# LlamaConfig's defaults, for the fields a config may leave out
DEFAULTS = {
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "num_key_value_heads": None,
    "head_dim": None,
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class Spec:
    """The hyperparameters, under transformers' config names (a stand-in for model.config)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    model_type: str = "llama"

    def get_text_config(self) -> Spec:
        return self


def spec_of(config: dict) -> Spec | None:
    """The Spec of a llama config (config.json's fields, or those a GGUF file's metadata maps to), or None
    where this module's math does not cover it (the reason is logged at debug level)."""
    reason = _not_covered(config)
    if reason:
        log.debug("decoding with transformers: %s", reason)
        return None
    values = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    rope = config.get("rope_parameters") or {}
    values["rope_theta"] = rope.get("rope_theta", values["rope_theta"])
    values["num_key_value_heads"] = values["num_key_value_heads"] or values["num_attention_heads"]
    values["head_dim"] = values["head_dim"] or values["hidden_size"] // values["num_attention_heads"]
    return Spec(**{f.name: values[f.name] for f in fields(Spec) if f.name != "model_type"})


def _not_covered(config: dict) -> str | None:
    if config.get("model_type") != "llama":
        return f"model_type {config.get('model_type')!r}"
    missing = [k for k in REQUIRED if not isinstance(config.get(k), int)]
    if missing:
        return f"the config has no {', '.join(missing)}"
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            return f"rope type {kind!r}"
    if config.get("hidden_act", "silu") != "silu":
        return f"hidden_act {config.get('hidden_act')!r}"
    if config.get("attention_bias") or config.get("mlp_bias"):
        return "biases in attention or MLP"
    return None


# --------------------------------------------------------------------------------------------------
# The model


class Linear(nn.Linear):
    """nn.Linear without the random init: the weights come from a checkpoint (and a random init on the
    meta device would import torch's compiler, over a second)."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without the random init (as Linear)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """weight * x / sqrt(mean(x^2) + eps), computed in float32."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on (batch, heads, seq, head_dim): the pairs are (x_i, x_{i + head_dim/2})."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            spec.num_attention_heads,
            spec.num_key_value_heads,
            spec.head_dim,
        )
        self.q_proj = Linear(spec.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = Linear(spec.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(spec.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.heads * self.head_dim, spec.hidden_size, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: tuple[Tensor, Tensor], start: int
    ) -> Tensor:
        """x: (batch, seq, hidden) at positions start..start+seq; `cache` (keys, values), each (batch,
        kv_heads, max positions, head_dim), takes this step's keys and values."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        keys, values = cache
        keys[:, :, start : start + t] = rotate(k, cos, sin)
        values[:, :, start : start + t] = v
        k, v = keys[:, :, : start + t], values[:, :, : start + t]
        # each key/value head serves heads / kv_heads query heads (enable_gqa: without copying them); the
        # first step sees its own earlier positions only, a later one-token step every cached one
        out = F.scaled_dot_product_attention(
            rotate(q, cos, sin), k, v, is_causal=start == 0 and t > 1, enable_gqa=self.kv_heads != self.heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.gate_proj = Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: tuple[Tensor, Tensor], start: int
    ) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return h + self.mlp(self.post_attention_layernorm(h))


class Body(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class Decoder(nn.Module):
    """The causal LM: `logits(ids, caches, start)` for a step, `continue_ids` for a whole answer."""

    base_model_prefix = "model"

    def __init__(self, spec: Spec):
        super().__init__()
        self.config = spec
        self.model = Body(spec)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def new_caches(self, batch: int, positions: int) -> list[tuple[Tensor, Tensor]]:
        """Empty (keys, values) for each layer, room for `positions` positions."""
        spec, weight = self.config, self.model.norm.weight
        shape = (batch, spec.num_key_value_heads, positions, spec.head_dim)
        return [
            tuple(torch.empty(shape, dtype=weight.dtype, device=weight.device) for _ in "kv")
            for _ in range(spec.num_hidden_layers)
        ]

    def rotary(self, positions: int) -> tuple[Tensor, Tensor]:
        """(cos, sin) of the rotary angles of positions 0..positions-1, (positions, head_dim) each: position
        p, pair i turns by p / theta^(2i / head_dim), computed in float32 as transformers computes it."""
        spec, weight = self.config, self.model.norm.weight
        exponents = torch.arange(0, spec.head_dim, 2, dtype=torch.int64, device=weight.device).float()
        inverse = 1.0 / spec.rope_theta ** (exponents / spec.head_dim)
        angles = torch.outer(torch.arange(positions, device=weight.device).float(), inverse)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(weight.dtype), angles.sin().to(weight.dtype)

    def hidden(self, ids: Tensor, caches: list[tuple[Tensor, Tensor]], start: int, rotary) -> Tensor:
        """The final normalized hidden states of `ids` (batch, seq) at positions start.. (their keys and
        values go into `caches`); `rotary`: `rotary(n)` for n past the last of them."""
        x = self.model.embed_tokens(ids)
        cos, sin = (table[start : start + ids.shape[1]] for table in rotary)
        for layer, cache in zip(self.model.layers, caches, strict=True):
            x = layer(x, cos, sin, cache, start)
        return self.model.norm(x)

    def logits(self, ids: Tensor, caches: list[tuple[Tensor, Tensor]], start: int, rotary) -> Tensor:
        """The next-token logits after the last of `ids` (batch, seq): (batch, vocab) in float32."""
        return self.lm_head(self.hidden(ids, caches, start, rotary)[:, -1]).float()

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits of every position (batch, seq, vocab), nothing cached beyond the call."""
        n = input_ids.shape[1]
        return self.lm_head(self.hidden(input_ids, self.new_caches(*input_ids.shape), 0, self.rotary(n)))

    @torch.no_grad()
    def continue_ids(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        stop: list[int],
        sampling: dict | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """The new token ids after `input_ids` (1, seq), up to and including a `stop` id, at most
        `max_new_tokens`: greedy, or sampled as transformers' generate samples (see `pick`)."""
        positions = input_ids.shape[1] + max_new_tokens
        caches, rotary = self.new_caches(1, positions), self.rotary(positions)
        ids, start, new = input_ids, 0, []
        while len(new) < max_new_tokens:
            token = pick(self.logits(ids, caches, start, rotary), sampling)
            new.append(token)
            if on_token:
                on_token(token)
            if token in stop:
                break
            start += ids.shape[1]
            ids = torch.tensor([[token]], device=input_ids.device)
        return new


TOP_K = 50  # transformers' generate keeps the 50 likeliest tokens when sampling, unless told otherwise
GENERATION_CONFIG = "generation_config.json"
# Its fields that `continue_ids` passes to transformers' generate itself (or that only name the file's
# origin), and fields at transformers' default (or None): a model dir whose generation config sets anything
# else (a repetition penalty, another top_k) is decoded by transformers, which applies them.
GENERATION_KEYS = {
    "bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "temperature", "top_p", "max_length",
    "max_new_tokens", "use_cache", "transformers_version", "_from_model_config",
}  # fmt: skip
GENERATION_DEFAULTS = {
    "top_k": TOP_K, "repetition_penalty": 1.0, "typical_p": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1,
    "min_length": 0, "num_return_sequences": 1, "length_penalty": 1.0, "output_attentions": False,
    "output_hidden_states": False, "output_scores": False, "return_dict_in_generate": False,
}  # fmt: skip


def pick(logits: Tensor, sampling: dict | None) -> int:
    """The next token from (1, vocab) logits: the likeliest; or, with `sampling` (temperature, top_p), a
    draw from the global generator after transformers' generate's own steps, in its order: divide by the
    temperature, keep the top 50, keep the smallest set of likeliest tokens whose probability reaches top_p,
    softmax, one multinomial draw."""
    if not sampling:
        return int(logits.argmax(-1))
    scores = logits / sampling["temperature"]
    kth = torch.topk(scores, min(TOP_K, scores.shape[-1]))[0][..., -1, None]
    scores = scores.masked_fill(scores < kth, -math.inf)
    ascending, order = torch.sort(scores, descending=False)
    tail = ascending.softmax(-1).cumsum(-1) <= 1 - sampling["top_p"]  # the unlikely tokens to drop
    tail[..., -1] = False  # the likeliest always stays
    scores = scores.masked_fill(tail.scatter(1, order, tail), -math.inf)
    return int(torch.multinomial(scores.softmax(-1), num_samples=1))


# --------------------------------------------------------------------------------------------------
# Loading


def config_fields(source) -> tuple[dict, GGUFFile | None] | None:
    """(the config fields, the GGUF header or None) of a local llama model (`source`: a ModelSource): a
    llama GGUF file's metadata as transformers maps it, or a model dir's config.json; None for anything else
    (a hub id, another architecture, a GGUF file transformers would read as another)."""
    from peftcli.models.gguf_load import fast_gguf, gguf_config_fields

    if not source.is_local:
        return None
    if source.gguf_file:
        path = f"{source.path}/{source.gguf_file}"
        gguf = fast_gguf(path)
        return None if gguf is None else ({**gguf_config_fields(gguf, path), "model_type": "llama"}, gguf)
    try:
        fields = json.loads((Path(source.path) / "config.json").read_text(encoding="utf-8"))
        generation = json.loads((Path(source.path) / GENERATION_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        generation = {}
    except (OSError, ValueError):
        return None  # transformers' loader says what is wrong
    if not isinstance(fields, dict) or not isinstance(generation, dict):
        return None
    changed = sorted(
        k
        for k, v in generation.items()
        if k not in GENERATION_KEYS and v is not None and GENERATION_DEFAULTS.get(k, ...) != v
    )
    if changed:  # e.g. a repetition penalty, which transformers' generate applies even when greedy
        log.debug("decoding with transformers: %s sets %s", GENERATION_CONFIG, ", ".join(changed))
        return None
    return fields, None


def load(source, dtype: torch.dtype, room: int | None = None) -> Decoder | None:
    """The Decoder of `source` with its weights (dense, in `dtype`), or None where this module does not
    cover the model, its checkpoint cannot be placed, or its weights would take more than `room` bytes."""
    from peftcli.models import filled

    found = config_fields(source)
    spec = spec_of(found[0]) if found else None
    if spec is None:
        return None
    with torch.device("meta"):
        model = Decoder(spec)
    need = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    if room is not None and need > room:
        log.debug("decoding with transformers: dense weights (%d bytes) exceed %d bytes", need, room)
        return None
    try:
        return filled.fill(model, spec, source, dtype, gguf=found[1]).eval()
    except filled.CannotFill as e:
        log.debug("decoding with transformers: %s", e)
        return None
