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

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from peftcli.errors import UserError
from peftcli.methods.common import check_keys, copy_checked, freeze
from peftcli.methods.virtual import (
    VirtualTokenModel,
    batch_size_of,
    check_not_seq2seq,
    check_prompt_learning_config,
    config_value,
    heads_state,
    load_heads_state,
    modules_to_save_from_config,
    num_heads_of,
    num_layers_of,
    prompt_learning_config,
    reject_cache,
    text_config,
    unwrap,
    wrap_heads,
)
from peftcli.recipe import MethodSection

PEFT_TYPE = "PREFIX_TUNING"
MERGEABLE = False
WHY_NOT_MERGEABLE = (
    "prefix tuning adds key/value positions in front of every attention layer's input; no change to the "
    "weights reproduces attention over extra positions, so it cannot be folded into the base model. "
    "Serve the base model with the adapter instead (`peft generate --adapter DIR`)."
)
METHOD = "prefix-tuning"


class PrefixEncoder(nn.Module):
    """Every layer's prefixes as one table: () -> (num_virtual_tokens, num_layers * 2 * token_dim).

    Without projection the table itself is the parameter. With projection, Li & Liang's reparametrisation
    (they found training the table directly unstable), the table is a 2-layer MLP's output:

        table = W2 tanh(W1 E + b1) + b2,   E: (num_virtual_tokens, token_dim),  W1: token_dim -> hidden_size
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        width: int,
        hidden_size: int | None,
        device: torch.device,
        dtype: torch.dtype,
    ):
        super().__init__()
        # nn.Embedding's N(0, 1) init and Linear's default init: HF PEFT's choices.
        if hidden_size is None:
            self.embedding = nn.Embedding(num_virtual_tokens, width, device=device, dtype=dtype)
            self.transform = None
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device, dtype=dtype)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, hidden_size, device=device, dtype=dtype),
                nn.Tanh(),
                nn.Linear(hidden_size, width, device=device, dtype=dtype),
            )

    def forward(self) -> Tensor:
        table = self.embedding.weight
        return table if self.transform is None else self.transform(table)


class PrefixTuningModel(VirtualTokenModel):
    """The frozen base model with a trainable key/value prefix in every attention layer."""

    def __init__(
        self,
        base_model: nn.Module,
        prefix_encoder: PrefixEncoder,
        num_virtual_tokens: int,
        task: str,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
    ):
        super().__init__(base_model, num_virtual_tokens, task)
        self.prefix_encoder = prefix_encoder
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim

    @property
    def token_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def prefix_cache(self, batch_size: int) -> DynamicCache:
        """A cache already holding every layer's prefix: per layer K, V: (batch, kv_heads, P, head_dim)."""
        table = self.prefix_encoder().to(self.dtype)  # (P, num_layers * 2 * token_dim)
        # (P, layers*2, heads, head_dim) -> (layers*2, heads, P, head_dim): rows 2l, 2l+1 are layer l's K, V.
        blocks = table.view(self.num_virtual_tokens, self.num_layers * 2, self.num_kv_heads, self.head_dim)
        blocks = blocks.permute(1, 2, 0, 3)
        # Every row of the batch shares the prefix: expand is a view, the cache's first concat copies it.
        layers = [
            (blocks[2 * i].expand(batch_size, -1, -1, -1), blocks[2 * i + 1].expand(batch_size, -1, -1, -1))
            for i in range(self.num_layers)
        ]
        return DynamicCache(layers, config=self.base_model.config)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs,
    ):
        reject_cache(kwargs, METHOD)
        batch_size = batch_size_of(input_ids, kwargs.get("inputs_embeds"))
        if kwargs.get("position_ids") is not None:
            # The prefix occupies positions 0 .. P-1, as HF PEFT shifts them too.
            kwargs["position_ids"] = kwargs["position_ids"] + self.num_virtual_tokens
        return self.base_model(
            input_ids=input_ids,
            attention_mask=self.extend_attention_mask(attention_mask),
            labels=labels,
            cache=self.prefix_cache(batch_size),
            **kwargs,
        )

    def generate(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **kwargs):
        """The base model's ``generate``, started from a cache that already holds the prefix.

        transformers reads a cache it is given as tokens that came before ``input_ids`` when the attention
        mask is longer than ``input_ids``: exactly the prefix's place. Positions follow the mask, so every
        row's first real token is at position P, left padding or not.
        """
        reject_cache(kwargs, METHOD)
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        if input_ids is None and inputs_embeds is None:
            raise UserError(f"{METHOD}: generate needs input_ids (or inputs_embeds)")
        if input_ids is not None:
            rows, mask = input_ids.shape[0], self.generation_mask(input_ids, attention_mask, kwargs)
        else:
            rows, length = inputs_embeds.shape[:2]
            mask = (
                attention_mask if attention_mask is not None else inputs_embeds.new_ones(rows, length).long()
            )
        if inputs_embeds is not None:
            # generate reads inputs_embeds as the whole sequence, cached part included, and drops what the
            # cache holds: zeros stand in for the prefix positions and are never computed.
            pad = inputs_embeds.new_zeros(rows, self.num_virtual_tokens, inputs_embeds.shape[-1])
            kwargs["inputs_embeds"] = torch.cat([pad, inputs_embeds], dim=1)
        with torch.no_grad():
            cache = self.prefix_cache(self.generation_batch_size(rows, kwargs))
        # Without caching, every step re-reads the whole sequence into the same cache and appends it again
        # after the prefix; the cache is what carries the prefix, so it stays on.
        kwargs["use_cache"] = True
        return self.base_model.generate(
            input_ids=input_ids, attention_mask=self.extend_attention_mask(mask), cache=cache, **kwargs
        )

    def gradient_checkpointing_enable(self, *args, **kwargs):
        raise UserError(_NO_CHECKPOINTING)

    activation_checkpointing_enable = gradient_checkpointing_enable  # the name transformers 5 prefers


# Checkpointed layers run without their cache (transformers drops it so the backward replay does not append
# twice), which would silently drop the prefix.
_NO_CHECKPOINTING = (
    "prefix tuning cannot train with gradient checkpointing: checkpointed layers drop the "
    "key/value cache that carries the prefix; set train.gradient_checkpointing: false"
)


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, num_key_value_heads, head_dim) of the model's attention layers.

    Under grouped-query attention the prefix has one key/value per kv head, not per query head: that is what
    the attention layers cache.
    """
    config = text_config(model)
    num_layers, num_heads = num_layers_of(model), num_heads_of(model)
    hidden = config_value(config, ("hidden_size", "n_embd", "d_model"), "hidden size")
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
                f"{METHOD}: {config.model_type} has attention layers of different key/value shapes "
                f"({sorted(shapes)}); one prefix shape cannot fit them all"
            )
    return num_layers, num_kv_heads, head_dim


# --------------------------------------------------------------------------------------------------
# The method contract


def inject(model: nn.Module, method: MethodSection, task: str) -> PrefixTuningModel:
    check_not_seq2seq(model, METHOD)
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise UserError(_NO_CHECKPOINTING)
    freeze(model)
    num_layers, num_kv_heads, head_dim = kv_shape(model)
    token_dim = num_kv_heads * head_dim
    weight = model.get_input_embeddings().weight
    hidden_size = (method.encoder_hidden_size or token_dim) if method.prefix_projection else None
    encoder = PrefixEncoder(
        method.num_virtual_tokens,
        token_dim,
        num_layers * 2 * token_dim,
        hidden_size,
        weight.device,
        weight.dtype,
    )
    wrap_heads(model, method, task)
    return PrefixTuningModel(
        model, encoder, method.num_virtual_tokens, task, num_layers, num_kv_heads, head_dim
    )


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    wrapper = unwrap(model, PrefixTuningModel, METHOD)
    with torch.no_grad():
        table = wrapper.prefix_encoder()  # the MLP's output when projecting: what HF PEFT saves
    return {"prompt_embeddings": table.detach(), **heads_state(wrapper.base_model)}


def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a saved prefix table (and heads).

    A plain encoder's table is copied in place, so an optimizer built on it keeps working (resume). A
    projecting encoder cannot take it (the MLP that made the table is not saved, as in HF PEFT): it is
    replaced by a plain encoder holding the table, which trains on from there. Its parameters are new
    objects, so an optimizer must be built after this call.
    """
    wrapper = unwrap(model, PrefixTuningModel, METHOD)
    check_keys({"prompt_embeddings", *heads_state(wrapper.base_model)}, set(state))
    encoder = wrapper.prefix_encoder
    if encoder.transform is not None:
        weight = encoder.embedding.weight
        width = wrapper.num_layers * 2 * wrapper.token_dim
        encoder = PrefixEncoder(
            wrapper.num_virtual_tokens, wrapper.token_dim, width, None, weight.device, weight.dtype
        )
        encoder.embedding.weight.requires_grad_(weight.requires_grad)
    copy_checked(encoder.embedding.weight, state["prompt_embeddings"], "prompt_embeddings")
    load_heads_state(wrapper.base_model, state)
    wrapper.prefix_encoder = encoder


def adapter_config(model: nn.Module, method: MethodSection, task: str) -> dict:
    wrapper = unwrap(model, PrefixTuningModel, METHOD)
    return {
        **prompt_learning_config(wrapper, wrapper.token_dim, wrapper.num_kv_heads, method),
        "encoder_hidden_size": method.encoder_hidden_size or wrapper.token_dim,
        "prefix_projection": method.prefix_projection,
        "init_weights": None,
    }


def method_from_config(config: dict) -> MethodSection:
    check_prompt_learning_config(config, METHOD)
    projection = bool(config.get("prefix_projection", False))
    return MethodSection(
        name=METHOD,
        num_virtual_tokens=config["num_virtual_tokens"],
        prefix_projection=projection,
        encoder_hidden_size=config.get("encoder_hidden_size") if projection else None,
        modules_to_save=modules_to_save_from_config(config, config.get("task_type")),
    )
