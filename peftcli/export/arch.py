"""Which models export, and llama.cpp's hyperparameter keys for each (``<arch>.block_count`` ...).

Exported: causal language models of the transformers types in `gguf_names.LLAMACPP_ARCH` (Llama and
Mistral as llama.cpp's "llama", Qwen2, GPT-2) whose math llama.cpp's graph for that architecture computes.
Anything else peftcli can load (OPT, BERT, a classifier, rope scaling, another activation ...) is refused
here with the reason, before anything is loaded or written.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcli.errors import UserError
from peftcli.models.gguf_names import LLAMACPP_ARCH

SUPPORTED = ", ".join(sorted(LLAMACPP_ARCH))


@dataclass(frozen=True)
class Hparams:
    arch: str  # llama.cpp's architecture name
    heads: int
    kv_heads: int
    keys: dict[str, int | float]  # llama.cpp's hyperparameter keys, without the "<arch>." prefix


def check_exportable(config, task: str) -> str:
    """llama.cpp's architecture for this transformers config, or a UserError naming what is not exported."""
    model_type = getattr(config, "model_type", None)
    if task != "causal-lm":
        raise UserError(
            f"export writes causal language models for llama.cpp; this run is a {task} adapter "
            f"(on a {model_type} model)"
        )
    if model_type not in LLAMACPP_ARCH:
        raise UserError(
            f"export: `{model_type}` models are not exported "
            f"(llama.cpp's GGUF is written here for {SUPPORTED})"
        )
    arch = LLAMACPP_ARCH[model_type]
    why = _unsupported_settings(config, arch)
    if why:
        raise UserError(
            f"export: this {model_type} model has {why}, which llama.cpp's `{arch}` does not compute"
        )
    return arch


def _unsupported_settings(config, arch: str) -> str | None:
    if arch == "gpt2":
        if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            return (
                f"activation_function {config.activation_function!r} (llama.cpp uses tanh-approximated GELU)"
            )
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(
            config, "scale_attn_weights", True
        ):
            return "non-standard attention scaling"
        if getattr(config, "add_cross_attention", False):
            return "cross-attention"
        return None
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (llama.cpp uses SiLU)"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return f"pretraining_tp {config.pretraining_tp}"
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        return f"rope scaling of type {rope.get('rope_type')!r}"
    return None


def rope_parameters(config) -> dict:
    """transformers 5 keeps rope_theta in ``rope_parameters``; 4.x in ``rope_theta`` and ``rope_scaling``."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    scaling = getattr(config, "rope_scaling", None)
    if scaling and "rope_type" not in params:
        params["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    return params


def hparams(config, arch: str) -> Hparams:
    """llama.cpp's hyperparameters of an exportable config (`check_exportable`)."""
    if arch == "gpt2":
        width, heads = config.n_embd, config.n_head
        keys = {
            "context_length": config.n_positions,
            "embedding_length": width,
            "feed_forward_length": config.n_inner or 4 * width,
            "block_count": config.n_layer,
            "attention.head_count": heads,
            "attention.layer_norm_epsilon": float(config.layer_norm_epsilon),
        }
        return Hparams(arch, heads, heads, keys)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    keys = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "block_count": config.num_hidden_layers,
        "attention.head_count": heads,
        "attention.head_count_kv": kv_heads,
        "rope.freq_base": float(rope_parameters(config).get("rope_theta", 10000.0)),
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "rope.dimension_count": head_dim,
        "vocab_size": config.vocab_size,
    }
    if head_dim * heads != config.hidden_size:
        keys["attention.key_length"] = keys["attention.value_length"] = head_dim
    return Hparams(arch, heads, kv_heads, keys)
