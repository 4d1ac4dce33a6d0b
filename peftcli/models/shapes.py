"""Parameter shapes of common architectures, read from config.json alone: no torch, no transformers.

`peft count` answers from these in well under a second, where building the model on the meta device
first imports torch and transformers' model code (8-18 s here, whatever the model's size). Only what is
modelled exactly is answered: Llama, Mistral, Qwen2 and GPT-2 as their causal-LM or
sequence-classification class, BERT and RoBERTa as the bare encoder or the sequence classifier, from a
local dir's config.json or a llama-architecture GGUF file (the packaged SmolLM2 among them). Anything
else (another architecture or class, a hub id, remote code, a config transformers would refuse) gets
None and the caller builds the real model.
tests/test_shapes.py holds every name and shape here equal to the meta model's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from peftcli.errors import UserError
from peftcli.models.gguf_header import STRING_TYPE, Array, TensorInfo, read_gguf
from peftcli.models.sources import ModelSource, resolve


class NotModelled(Exception):
    """What the shapes cannot tell exactly: the caller builds the real model instead."""


@dataclass(frozen=True)
class Linear:
    """An nn.Linear or a GPT-2 Conv1D, by what it maps: in_features -> out_features."""

    in_features: int
    out_features: int
    conv1d: bool = False  # GPT-2's Conv1D (never quantized: peftcli/quant holds nn.Linear layers only)


@dataclass
class Shapes:
    model_type: str
    task: str  # causal-lm | sequence-classification
    num_layers: int
    num_kv_heads: int
    head_dim: int
    embed_dim: int  # the input embedding's width
    # Every parameter name, tied ones too (named_parameters(remove_duplicate=False)), in model order ->
    # (the name of the tensor it is, its number of elements): a tied name points at its first owner.
    params: dict[str, tuple[str, int]] = field(default_factory=dict)
    linears: dict[str, Linear] = field(default_factory=dict)  # by module name, in model order
    output_head: str | None = None  # the module get_output_embeddings() returns
    gguf_tensors: list[TensorInfo] = field(default_factory=list)  # a GGUF file's tensor table, else empty

    def add(self, name: str, *shape: int, tied_to: str | None = None) -> None:
        self.params[name] = (tied_to or name, math.prod(shape))

    def add_linear(self, name: str, in_features: int, out_features: int, bias: bool, conv1d: bool = False):
        self.linears[name] = Linear(in_features, out_features, conv1d)
        self.add(f"{name}.weight", *((in_features, out_features) if conv1d else (out_features, in_features)))
        if bias:
            self.add(f"{name}.bias", out_features)

    def numel(self, module: str | None = None) -> int:
        """Parameters of the whole model, or of one module, each tensor once."""
        tensors = {
            tensor: numel
            for name, (tensor, numel) in self.params.items()
            if module is None or name.startswith(module + ".")
        }
        return sum(tensors.values())

    def module_names(self) -> list[str]:
        """Every module that holds a parameter, and their parents, in model order."""
        names: dict[str, None] = {}
        for param in self.params:
            parts = param.split(".")[:-1]
            for i in range(1, len(parts) + 1):
                names.setdefault(".".join(parts[:i]))
        return list(names)

    def bias_owners(self) -> list[str]:
        """Modules that own a bias, in model order, a tied bias under its first owner."""
        return [
            p.removesuffix(".bias")
            for p, (tensor, _) in self.params.items()
            if p.endswith(".bias") and p == tensor
        ]


# model_type -> ({class meta_model may build: what it is}, config defaults). A "model" is the bare
# encoder (BertModel), which `peft count` treats as the causal-lm task does: no head, nothing saved.
_LLAMA_DEFAULTS = {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
_ENCODER_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}
ARCHITECTURES: dict[str, tuple[dict[str, str], dict]] = {
    "llama": (
        {"LlamaForCausalLM": "causal-lm", "LlamaForSequenceClassification": "sequence-classification"},
        {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, **_LLAMA_DEFAULTS},
    ),
    "mistral": (
        {"MistralForCausalLM": "causal-lm", "MistralForSequenceClassification": "sequence-classification"},
        {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 8, **_LLAMA_DEFAULTS},
    ),
    "qwen2": (
        {"Qwen2ForCausalLM": "causal-lm", "Qwen2ForSequenceClassification": "sequence-classification"},
        {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, **_LLAMA_DEFAULTS},
    ),
    "gpt2": (
        {"GPT2LMHeadModel": "causal-lm", "GPT2ForSequenceClassification": "sequence-classification"},
        {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
         "n_inner": None, "tie_word_embeddings": True, "add_cross_attention": False},
    ),
    "bert": (
        {"BertModel": "model", "BertForSequenceClassification": "sequence-classification"},
        {"vocab_size": 30522, "pad_token_id": 0, **_ENCODER_DEFAULTS},
    ),
    "roberta": (
        {"RobertaModel": "model", "RobertaForSequenceClassification": "sequence-classification"},
        {"vocab_size": 50265, "pad_token_id": 1, **_ENCODER_DEFAULTS},
    ),
}  # fmt: skip


# GPT2Config's other names for its fields: where config.json uses one, it wins (as in transformers).
_GPT2_ALIASES = {
    "hidden_size": "n_embd",
    "max_position_embeddings": "n_positions",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}


def config_shapes(
    source: ModelSource | str, task: str | None = None, trust_remote_code: bool = False
) -> Shapes | None:
    """The shapes of the model `source` names, built as `models.load.meta_model` builds it; None: not
    modelled (or a name that points nowhere: the real path says what is wrong)."""
    if isinstance(source, str):
        try:
            source = resolve(source)
        except UserError:
            return None
    config_file = Path(source.path) / (source.gguf_file or "config.json")
    if not source.is_local or not config_file.is_file():
        return None
    try:
        if not source.gguf_file:
            return _from_config(json.loads(config_file.read_text()), task, trust_remote_code)
        gguf = read_gguf(str(config_file))
        shapes = _from_config(
            _gguf_config(gguf.metadata, [t.name for t in gguf.tensors]), task, trust_remote_code
        )
        shapes.gguf_tensors = gguf.tensors
        return shapes
    # GGUFError is a ValueError; the others: malformed configs (wrong types, missing keys)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, NotModelled):
        return None


_GGUF_PREFIXES = {"general", "llama", "tokenizer", "split", "quantize"}


def _gguf_config(metadata: dict, tensors: list[str]) -> dict:
    """The config transformers makes of a llama-architecture GGUF file's metadata (shape keys only);
    `tensors`: the file's tensor names."""
    name = metadata.get("general.name", "")
    if (
        metadata.get("general.architecture") != "llama"
        or not isinstance(name, str)
        or "mistral" in name.lower()
    ):
        raise NotModelled("GGUF architecture")  # transformers reads a llama.cpp "mistral" as Mistral
    # transformers maps keys of every architecture it knows, whatever the file's: only llama's are modelled
    if any(key.split(".", 1)[0] not in _GGUF_PREFIXES for key in metadata):
        raise NotModelled("GGUF keys of another architecture")
    for key in ("llama.context_length", "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"):
        if key in metadata and type(metadata[key]) not in (int, float):  # strict config fields refuse them
            raise NotModelled(f"GGUF {key}: {metadata[key]!r}")
    vocab, tokens = metadata.get("llama.vocab_size"), metadata.get("tokenizer.ggml.tokens")
    if vocab is None:  # transformers' fallback: the vocabulary's length (a 1-item array would be unwrapped)
        if not (isinstance(tokens, Array) and tokens.item_type == STRING_TYPE and tokens.length > 1):
            raise NotModelled("GGUF vocabulary")
        vocab = tokens.length
    return {
        "model_type": "llama",
        "num_hidden_layers": metadata["llama.block_count"],
        "hidden_size": metadata["llama.embedding_length"],
        "intermediate_size": metadata["llama.feed_forward_length"],
        "num_attention_heads": metadata["llama.attention.head_count"],
        "num_key_value_heads": metadata.get("llama.attention.head_count_kv"),
        "head_dim": metadata.get("llama.rope.dimension_count"),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors,  # no output tensor: the embedding serves
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }


def _from_config(config: dict, task: str | None, trust_remote_code: bool) -> Shapes:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise NotModelled(f"model_type {model_type!r}")
    if trust_remote_code and config.get("auto_map"):
        raise NotModelled("remote code")
    classes, defaults = ARCHITECTURES[model_type]
    # the class meta_model builds: the config's own unless a task is asked for; another class (a bare
    # decoder, another head) is not modelled
    if task is None and config.get("architectures"):
        kind = classes[config["architectures"][0]]
    elif (task or "causal-lm") in classes.values():
        kind = task or "causal-lm"
    else:  # e.g. BERT as a causal LM (BertLMHeadModel)
        raise NotModelled(f"{model_type} as {task or 'causal-lm'}")
    config = {**defaults, **config}
    if model_type == "gpt2":
        config.update({field: config[alias] for alias, field in _GPT2_ALIASES.items() if alias in config})
        return _gpt2(config, kind)
    if model_type in ("bert", "roberta"):
        return _encoder(config, kind)
    return _llama_like(config, kind)


def _int(c: dict, key: str, default: int | None = None) -> int:
    """A positive integer field; a missing or null one takes `default`. Anything else: not modelled
    (transformers' strict config fields refuse it, or the model cannot be built)."""
    value = c.get(key)
    if value is None and default is not None:
        return default
    if type(value) is not int or value <= 0:
        raise NotModelled(f"{key}: {value!r}")
    return value


def _flag(c: dict, key: str) -> bool:
    if type(c[key]) is not bool:
        raise NotModelled(f"{key}: {c[key]!r}")
    return c[key]


def _num_labels(config: dict) -> int:
    id2label, num_labels = config.get("id2label"), config.get("num_labels")
    if id2label is not None and num_labels is not None and len(id2label) != num_labels:
        raise NotModelled("num_labels and id2label disagree")
    return len(id2label) if id2label is not None else _int(config, "num_labels", 2)


def _llama_like(c: dict, task: str) -> Shapes:
    hidden, heads = _int(c, "hidden_size"), _int(c, "num_attention_heads")
    if hidden % heads:  # transformers' config validation refuses it, head_dim or not
        raise NotModelled("hidden_size not a multiple of num_attention_heads")
    if c["model_type"] == "qwen2" and "head_dim" in c and c["head_dim"] is None:
        raise NotModelled("qwen2 with head_dim null")  # its attention reads the null and fails
    kv_heads = _int(c, "num_key_value_heads", heads)
    head_dim = _int(c, "head_dim", hidden // heads)
    # Only Llama reads the bias flags; Mistral has none, Qwen2 biases q, k and v.
    attention_bias = c["model_type"] == "llama" and _flag(c, "attention_bias")
    qkv_bias = c["model_type"] == "qwen2" or attention_bias
    mlp_bias = c["model_type"] == "llama" and _flag(c, "mlp_bias")
    inter = _int(c, "intermediate_size")
    s = Shapes(c["model_type"], task, _int(c, "num_hidden_layers"), kv_heads, head_dim, hidden)
    vocab = _int(c, "vocab_size")
    _check_padding(c, vocab)
    s.add("model.embed_tokens.weight", vocab, hidden)
    for i in range(s.num_layers):
        layer = f"model.layers.{i}"
        s.add_linear(f"{layer}.self_attn.q_proj", hidden, heads * head_dim, qkv_bias)
        s.add_linear(f"{layer}.self_attn.k_proj", hidden, kv_heads * head_dim, qkv_bias)
        s.add_linear(f"{layer}.self_attn.v_proj", hidden, kv_heads * head_dim, qkv_bias)
        s.add_linear(f"{layer}.self_attn.o_proj", heads * head_dim, hidden, attention_bias)
        s.add_linear(f"{layer}.mlp.gate_proj", hidden, inter, mlp_bias)
        s.add_linear(f"{layer}.mlp.up_proj", hidden, inter, mlp_bias)
        s.add_linear(f"{layer}.mlp.down_proj", inter, hidden, mlp_bias)
        s.add(f"{layer}.input_layernorm.weight", hidden)
        s.add(f"{layer}.post_attention_layernorm.weight", hidden)
    s.add("model.norm.weight", hidden)
    _head(s, c, "model.embed_tokens.weight", hidden)
    return s


def _gpt2(c: dict, task: str) -> Shapes:
    if _flag(c, "add_cross_attention"):
        raise NotModelled("cross-attention blocks")
    if "head_dim" in c or "num_key_value_heads" in c:  # prefix tuning would read these; GPT-2 does not
        raise NotModelled("GPT-2 config with head_dim or num_key_value_heads")
    width, heads, positions = _int(c, "n_embd"), _int(c, "n_head"), _int(c, "n_positions")
    if width % heads:
        raise NotModelled("n_embd not a multiple of n_head")
    inner = _int(c, "n_inner", 4 * width)
    s = Shapes("gpt2", task, _int(c, "n_layer"), heads, width // heads, width)
    s.add("transformer.wte.weight", _int(c, "vocab_size"), width)
    s.add("transformer.wpe.weight", positions, width)
    for i in range(s.num_layers):
        block = f"transformer.h.{i}"
        s.add(f"{block}.ln_1.weight", width)
        s.add(f"{block}.ln_1.bias", width)
        s.add_linear(f"{block}.attn.c_attn", width, 3 * width, True, conv1d=True)
        s.add_linear(f"{block}.attn.c_proj", width, width, True, conv1d=True)
        s.add(f"{block}.ln_2.weight", width)
        s.add(f"{block}.ln_2.bias", width)
        s.add_linear(f"{block}.mlp.c_fc", width, inner, True, conv1d=True)
        s.add_linear(f"{block}.mlp.c_proj", inner, width, True, conv1d=True)
    s.add("transformer.ln_f.weight", width)
    s.add("transformer.ln_f.bias", width)
    _head(s, c, "transformer.wte.weight", width)
    return s


def _encoder(c: dict, kind: str) -> Shapes:
    """BERT or RoBERTa: the bare encoder (with its pooler), or the sequence classifier."""
    roberta = c["model_type"] == "roberta"
    if c.get("position_embedding_type", "absolute") != "absolute" or c.get("add_cross_attention"):
        raise NotModelled("relative positions or cross-attention")
    hidden, heads, inter = (
        _int(c, "hidden_size"),
        _int(c, "num_attention_heads"),
        _int(c, "intermediate_size"),
    )
    vocab, positions, types = (
        _int(c, "vocab_size"),
        _int(c, "max_position_embeddings"),
        _int(c, "type_vocab_size"),
    )
    if hidden % heads:
        raise NotModelled("hidden_size not a multiple of num_attention_heads")
    _check_padding(c, min(vocab, positions) if roberta else vocab)  # RoBERTa's positions pad too
    task = "sequence-classification" if kind == "sequence-classification" else "causal-lm"
    s = Shapes(c["model_type"], task, _int(c, "num_hidden_layers"), heads, hidden // heads, hidden)
    base = "" if kind == "model" else ("roberta." if roberta else "bert.")
    embeddings = {
        "word_embeddings.weight": (vocab, hidden),
        "position_embeddings.weight": (positions, hidden),
        "token_type_embeddings.weight": (types, hidden),
        "LayerNorm.weight": (hidden,),
        "LayerNorm.bias": (hidden,),
    }
    order = list(embeddings)
    if roberta:  # RoBERTa registers its position table last
        order.append(order.pop(1))
    for name in order:
        s.add(f"{base}embeddings.{name}", *embeddings[name])
    for i in range(s.num_layers):
        layer = f"{base}encoder.layer.{i}"
        for part in ("query", "key", "value"):
            s.add_linear(f"{layer}.attention.self.{part}", hidden, hidden, True)
        s.add_linear(f"{layer}.attention.output.dense", hidden, hidden, True)
        s.add(f"{layer}.attention.output.LayerNorm.weight", hidden)
        s.add(f"{layer}.attention.output.LayerNorm.bias", hidden)
        s.add_linear(f"{layer}.intermediate.dense", hidden, inter, True)
        s.add_linear(f"{layer}.output.dense", inter, hidden, True)
        s.add(f"{layer}.output.LayerNorm.weight", hidden)
        s.add(f"{layer}.output.LayerNorm.bias", hidden)
    if kind == "model" or not roberta:  # RoBERTa's classifier reads the first token, not a pooler
        s.add_linear(f"{base}pooler.dense", hidden, hidden, True)
    if kind == "sequence-classification":
        if roberta:
            s.add_linear("classifier.dense", hidden, hidden, True)
            s.add_linear("classifier.out_proj", hidden, _num_labels(c), True)
        else:
            s.add_linear("classifier", hidden, _num_labels(c), True)
    return s


def _check_padding(c: dict, size: int) -> None:
    """nn.Embedding refuses a padding index outside its table."""
    pad = c.get("pad_token_id")
    if pad is not None and (type(pad) is not int or not -size <= pad < size):
        raise NotModelled(f"pad_token_id {pad!r}")


def _head(s: Shapes, c: dict, embedding: str, hidden: int) -> None:
    """lm_head (tied to the input embedding where the config says so) or the classifier `score`."""
    if s.task == "sequence-classification":
        s.add_linear("score", hidden, _num_labels(c), False)
        return
    vocab = _int(c, "vocab_size")
    s.linears["lm_head"] = Linear(hidden, vocab)
    s.add("lm_head.weight", vocab, hidden, tied_to=embedding if _flag(c, "tie_word_embeddings") else None)
    s.output_head = "lm_head"
