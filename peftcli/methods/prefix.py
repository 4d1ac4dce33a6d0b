"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190): trainable keys/values each attention layer sees first.

Each layer l attends over its prefix and then the real tokens:

    attention_l(x) = softmax(q [P_k^l; K]^T / sqrt(d)) [P_v^l; V],   P_k^l, P_v^l: (virtual tokens, kv_width)

The base model stays frozen and unchanged. The prefixes reach it as an already-filled key/value cache
(transformers' ``DynamicCache``), so the real tokens sit at positions ``num_virtual_tokens ...`` as if the
prefix had been read before them, and the attention mask grows by ``num_virtual_tokens`` ones at the front.

Saved as HF PEFT does: one tensor ``prompt_embeddings``, (num_virtual_tokens, num_layers * 2 * token_dim),
token_dim being the key/value width (head_dim x num_key_value_heads under grouped-query attention). With
``prefix_projection`` the file holds the MLP's *output*, not its weights: a loaded adapter keeps that table as
its parameter (HF PEFT does the same when it loads for inference); the MLP exists only while training afresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from peftcli.errors import UserError
from peftcli.lazy import LazyModule, nn, torch
from peftcli.methods.base import (
    Context,
    Fail,
    MethodConfig,
    check_positive,
    check_prompt_learning_fields,
    prompt_learning_modules_to_save,
)

if TYPE_CHECKING:
    from torch import Tensor

    from peftcli.methods.virtual import VirtualTokenModel
    from peftcli.models.shapes import Shapes

modules = LazyModule("peftcli.methods.modules")
virtual = LazyModule("peftcli.methods.virtual")

NAME = "prefix-tuning"
PEFT_TYPE = "PREFIX_TUNING"
MERGEABLE = False
WHY_NOT_MERGEABLE = (
    "prefix tuning adds key/value positions in front of every attention layer's input; no change to the "
    "weights reproduces attention over extra positions, so it cannot be folded into the base model. "
    "Serve the base model with the adapter instead (`peft generate RUN_DIR`)."
)
# The learning rate a recipe gets when it sets none: HF PEFT's prefix tuning guide trains with 1e-2; a prefix
# has no pretrained starting point and moves slowly at the rates LoRA uses.
LEARNING_RATE = 1e-2

# Checkpointed layers run without their cache (transformers drops it so the backward replay does not append
# twice), which would silently drop the prefix.
NO_CHECKPOINTING = (
    "prefix tuning cannot train with gradient checkpointing: checkpointed layers drop the "
    "key/value cache that carries the prefix; set train.gradient_checkpointing: false"
)


@dataclass
class Config(MethodConfig):
    name: ClassVar[str] = NAME

    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # reparametrise prefixes through a 2-layer MLP
    encoder_hidden_size: int | None = None  # the MLP's hidden width; default: the key/value width

    def check(self, fail: Fail) -> None:
        check_positive(self, "num_virtual_tokens encoder_hidden_size", fail)


# --------------------------------------------------------------------------------------------------
# The prefix table


def prefix_encoder(num_virtual_tokens: int, token_dim: int, width: int, hidden_size: int | None, factory):
    """Every layer's prefixes as one table, (num_virtual_tokens, num_layers * 2 * token_dim).

    Without projection the table itself is the parameter (``embedding``). With projection, Li & Liang's
    reparametrisation (they found training the table directly unstable), the table is a 2-layer MLP's output:

        table = W2 tanh(W1 E + b1) + b2,   E: (num_virtual_tokens, token_dim),  W1: token_dim -> hidden_size
    """
    # nn.Embedding's N(0, 1) init and Linear's default init: HF PEFT's choices.
    encoder = nn.Module()
    if hidden_size is None:
        encoder.embedding = nn.Embedding(num_virtual_tokens, width, **factory)
        encoder.transform = None
    else:
        encoder.embedding = nn.Embedding(num_virtual_tokens, token_dim, **factory)
        encoder.transform = nn.Sequential(
            nn.Linear(token_dim, hidden_size, **factory), nn.Tanh(), nn.Linear(hidden_size, width, **factory)
        )
    return encoder


def prefix_table(encoder) -> Tensor:
    table = encoder.embedding.weight
    return table if encoder.transform is None else encoder.transform(table)


def prefix_cache(model: VirtualTokenModel, batch_size: int):
    """A DynamicCache already holding every layer's prefix: per layer K, V: (batch, kv_heads, P, head_dim)."""
    from transformers import DynamicCache

    table = prefix_table(model.prefix_encoder).to(model.dtype)  # (P, num_layers * 2 * token_dim)
    # (P, layers*2, heads, head_dim) -> (layers*2, heads, P, head_dim): rows 2l, 2l+1 are layer l's K, V.
    blocks = table.view(model.num_virtual_tokens, model.num_layers * 2, model.num_kv_heads, model.head_dim)
    blocks = blocks.permute(1, 2, 0, 3)
    # Every row of the batch shares the prefix: expand is a view, the cache's first concat copies it.
    layers = [
        (blocks[2 * i].expand(batch_size, -1, -1, -1), blocks[2 * i + 1].expand(batch_size, -1, -1, -1))
        for i in range(model.num_layers)
    ]
    return DynamicCache(layers, config=model.base_model.config)


# --------------------------------------------------------------------------------------------------
# The wrapper's forward and generate


def run_forward(model: VirtualTokenModel, input_ids, attention_mask, labels, **kwargs):
    virtual.reject_cache(kwargs, NAME)
    batch_size = virtual.batch_size_of(input_ids, kwargs.get("inputs_embeds"))
    if kwargs.get("position_ids") is not None:
        # The prefix occupies positions 0 .. P-1, as HF PEFT shifts them too.
        kwargs["position_ids"] = kwargs["position_ids"] + model.num_virtual_tokens
    return model.base_model(
        input_ids=input_ids,
        attention_mask=model.extend_attention_mask(attention_mask),
        labels=labels,
        cache=prefix_cache(model, batch_size),
        **kwargs,
    )


def run_generate(model: VirtualTokenModel, input_ids, attention_mask, **kwargs):
    """The base model's ``generate``, started from a cache that already holds the prefix.

    transformers reads a cache it is given as tokens that came before ``input_ids`` when the attention
    mask is longer than ``input_ids``: exactly the prefix's place. Positions follow the mask, so every
    row's first real token is at position P, left padding or not.
    """
    virtual.reject_cache(kwargs, NAME)
    inputs_embeds = kwargs.pop("inputs_embeds", None)
    if input_ids is None and inputs_embeds is None:
        raise UserError(f"{NAME}: generate needs input_ids (or inputs_embeds)")
    if input_ids is not None:
        rows, mask = input_ids.shape[0], model.generation_mask(input_ids, attention_mask, kwargs)
    else:
        rows, length = inputs_embeds.shape[:2]
        mask = attention_mask if attention_mask is not None else inputs_embeds.new_ones(rows, length).long()
    if inputs_embeds is not None:
        # generate reads inputs_embeds as the whole sequence, cached part included, and drops what the
        # cache holds: zeros stand in for the prefix positions and are never computed.
        pad = inputs_embeds.new_zeros(rows, model.num_virtual_tokens, inputs_embeds.shape[-1])
        kwargs["inputs_embeds"] = torch.cat([pad, inputs_embeds], dim=1)
    with torch.no_grad():
        cache = prefix_cache(model, model.generation_batch_size(rows, kwargs))
    # Without caching, every step re-reads the whole sequence into the same cache and appends it again
    # after the prefix; the cache is what carries the prefix, so it stays on.
    kwargs["use_cache"] = True
    return model.base_model.generate(
        input_ids=input_ids, attention_mask=model.extend_attention_mask(mask), cache=cache, **kwargs
    )


def kv_shape(model) -> tuple[int, int, int]:
    """(num_layers, num_key_value_heads, head_dim) of the model's attention layers.

    Under grouped-query attention the prefix has one key/value per kv head, not per query head: that is what
    the attention layers cache.
    """
    config = virtual.text_config(model)
    num_layers, num_heads = virtual.num_layers_of(model), virtual.num_heads_of(model)
    hidden = virtual.config_value(config, ("hidden_size", "n_embd", "d_model"), "hidden size")
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    per_layer = getattr(config, "per_layer_config", None)
    if per_layer is not None:
        shapes = {
            (
                getattr(layer, "num_key_value_heads", None) or num_kv_heads,
                getattr(layer, "head_dim", None) or head_dim,
            )
            for layer in per_layer
        }
        if len(shapes) > 1:
            raise UserError(
                f"{NAME}: {config.model_type} has attention layers of different key/value shapes "
                f"({sorted(shapes)}); one prefix shape cannot fit them all"
            )
    return num_layers, num_kv_heads, head_dim


# --------------------------------------------------------------------------------------------------
# The method contract


def inject(model, config: Config, context: Context) -> VirtualTokenModel:
    virtual.check_not_seq2seq(model, NAME)
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise UserError(NO_CHECKPOINTING)
    modules.freeze(model)
    num_layers, num_kv_heads, head_dim = kv_shape(model)
    token_dim = num_kv_heads * head_dim
    weight = model.get_input_embeddings().weight
    hidden_size = (config.encoder_hidden_size or token_dim) if config.prefix_projection else None
    encoder = prefix_encoder(
        config.num_virtual_tokens,
        token_dim,
        num_layers * 2 * token_dim,
        hidden_size,
        {"device": weight.device, "dtype": weight.dtype},
    )
    virtual.wrap_heads(model, config, context.task)
    return virtual.VirtualTokenModel(
        model,
        NAME,
        config.num_virtual_tokens,
        context.task,
        run_forward,
        run_generate,
        "PrefixTuningModel",
        no_checkpointing=NO_CHECKPOINTING,
        prefix_encoder=encoder,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        token_dim=token_dim,
    )


def adapter_state(model) -> dict[str, Tensor]:
    wrapper = virtual.unwrap(model, NAME)
    with torch.no_grad():
        table = prefix_table(wrapper.prefix_encoder)  # the MLP's output when projecting: what HF PEFT saves
    return {"prompt_embeddings": table.detach(), **virtual.heads_state(wrapper.base_model)}


def load_adapter_state(model, state: dict[str, Tensor]) -> None:
    """Load a saved prefix table (and heads).

    A plain encoder's table is copied in place, so an optimizer built on it keeps working (resume). A
    projecting encoder cannot take it (the MLP that made the table is not saved, as in HF PEFT): it is
    replaced by a plain encoder holding the table, which trains on from there. Its parameters are new
    objects, so an optimizer must be built after this call.
    """
    wrapper = virtual.unwrap(model, NAME)
    modules.check_keys({"prompt_embeddings", *virtual.heads_state(wrapper.base_model)}, set(state))
    encoder = wrapper.prefix_encoder
    if encoder.transform is not None:
        weight = encoder.embedding.weight
        width = wrapper.num_layers * 2 * wrapper.token_dim
        factory = {"device": weight.device, "dtype": weight.dtype}
        encoder = prefix_encoder(wrapper.num_virtual_tokens, wrapper.token_dim, width, None, factory)
        encoder.embedding.weight.requires_grad_(weight.requires_grad)
    modules.copy_checked(encoder.embedding.weight, state["prompt_embeddings"], "prompt_embeddings")
    virtual.load_heads_state(wrapper.base_model, state)
    wrapper.prefix_encoder = encoder


def merge(model):
    raise UserError(f"method {NAME} cannot be merged: {WHY_NOT_MERGEABLE}")


# --------------------------------------------------------------------------------------------------
# Counting from shapes


def count(shapes: Shapes, config: Config, saved: list[str]) -> tuple[int, int]:
    token_dim = shapes.num_kv_heads * shapes.head_dim
    width = shapes.num_layers * 2 * token_dim  # a key and a value per layer
    if not config.prefix_projection:
        added = config.num_virtual_tokens * width
    else:  # the table, then Linear(token_dim -> hidden), Tanh, Linear(hidden -> width)
        hidden = config.encoder_hidden_size or token_dim
        added = config.num_virtual_tokens * token_dim + (token_dim + 1) * hidden + (hidden + 1) * width
    return added, added


# --------------------------------------------------------------------------------------------------
# adapter_config.json, both ways


def adapter_config(model, config: Config, task: str) -> dict:
    wrapper = virtual.unwrap(model, NAME)
    return {
        **virtual.prompt_learning_config(wrapper, wrapper.token_dim, wrapper.num_kv_heads, config),
        "encoder_hidden_size": config.encoder_hidden_size or wrapper.token_dim,
        "prefix_projection": config.prefix_projection,
        "init_weights": None,
    }


def config_from_adapter(fields: dict) -> Config:
    check_prompt_learning_fields(fields, NAME)
    projection = bool(fields.get("prefix_projection", False))
    return Config(
        num_virtual_tokens=fields["num_virtual_tokens"],
        prefix_projection=projection,
        encoder_hidden_size=fields.get("encoder_hidden_size") if projection else None,
        modules_to_save=prompt_learning_modules_to_save(fields),
    )
