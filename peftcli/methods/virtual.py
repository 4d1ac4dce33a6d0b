"""What prefix tuning and prompt tuning share: a wrapper around the frozen base model adding virtual tokens.

Neither method changes a layer, so neither can be swapped in place. `VirtualTokenModel` keeps the base model
as ``.base_model``, answers what a training loop or ``generate`` asks of a model (``config``, ``device``,
``generation_config``, ``get_input_embeddings`` ...) by asking the base model, and holds the helpers both
methods need: the attention mask grown by the virtual tokens, the batch size a ``generate`` call will reach,
and the classification head's state under HF PEFT's prompt-learning keys. Its ``forward`` and ``generate``
are the method's own functions (prefix.py, prompt.py), so each method's math stays in its own module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from peftcli.errors import UserError
from peftcli.methods.base import MethodConfig, saved_modules
from peftcli.methods.modules import (
    KEY_PREFIX,
    AdapterError,
    Switchable,
    load_modules_to_save_state,
    modules_to_save_state,
    wrap_modules_to_save,
)

# HF PEFT stores a prompt-learning model's head under `base_model.<path>`: its base_model is the transformers
# model itself, not a tuner wrapping it as for LoRA (`base_model.model.<path>`).
HEAD_KEY_PREFIX = "base_model."


class VirtualTokenModel(Switchable):
    """A frozen base model plus `num_virtual_tokens` trainable tokens that every input sees first.

    ``run_forward(self, input_ids, attention_mask, labels, **kwargs)`` and ``run_generate(self, input_ids,
    attention_mask, **kwargs)`` are the method's; anything else is looked up on the base model, so a
    training loop can call ``model.config`` or ``model.get_input_embeddings()`` as it would on the base.
    ``no_checkpointing``: why the method cannot train with activation checkpointing, if it cannot.
    While switched off (``modules.disabled``) both call the base model directly: no virtual tokens.
    """

    def __init__(
        self,
        base_model: nn.Module,
        method: str,
        num_virtual_tokens: int,
        task: str,
        run_forward: Callable,
        run_generate: Callable,
        label: str,
        no_checkpointing: str | None = None,
        **settings,
    ):
        super().__init__()
        self.base_model = base_model
        self.method, self.num_virtual_tokens, self.task = method, num_virtual_tokens, task
        self.run_forward, self.run_generate, self.label = run_forward, run_generate, label
        self.no_checkpointing = no_checkpointing
        # Leading positions of the outputs (logits, hidden states) that belong to virtual tokens: a loop that
        # computes its own loss from them drops these first.
        self.output_offset = 0
        for name, value in settings.items():
            setattr(self, name, value)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules
        except AttributeError:
            if name == "base_model":  # not set yet: do not recurse
                raise
            return getattr(self.base_model, name)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if not self.adapter_enabled:
            return self.base_model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
            )
        return self.run_forward(self, input_ids, attention_mask, labels, **kwargs)

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        if not self.adapter_enabled:
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return self.run_generate(self, input_ids, attention_mask, **kwargs)

    def gradient_checkpointing_enable(self, *args, **kwargs):
        if self.no_checkpointing:
            raise UserError(self.no_checkpointing)
        return self.base_model.gradient_checkpointing_enable(*args, **kwargs)

    def activation_checkpointing_enable(self, *args, **kwargs):  # the name transformers 5 prefers
        if self.no_checkpointing:
            raise UserError(self.no_checkpointing)
        return self.base_model.activation_checkpointing_enable(*args, **kwargs)

    def _get_name(self) -> str:
        return self.label

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base_model.parameters()).dtype

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def extend_attention_mask(self, attention_mask: Tensor | None) -> Tensor | None:
        """(batch, seq) -> (batch, num_virtual_tokens + seq): every row attends to every virtual token."""
        if attention_mask is None:
            return None
        ones = attention_mask.new_ones(attention_mask.shape[0], self.num_virtual_tokens)
        return torch.cat([ones, attention_mask], dim=1)

    def generation_mask(self, input_ids: Tensor, attention_mask: Tensor | None, kwargs: dict) -> Tensor:
        """The real tokens' mask for ``generate``; if not given, inferred from padding like transformers."""
        if attention_mask is not None:
            return attention_mask
        config = kwargs.get("generation_config") or self.base_model.generation_config
        pad = kwargs.get("pad_token_id", config.pad_token_id)
        eos = kwargs.get("eos_token_id", config.eos_token_id)
        eos = eos if isinstance(eos, list) else [eos]
        if pad is not None and pad not in eos and bool((input_ids == pad).any()):
            return (input_ids != pad).long()
        return torch.ones_like(input_ids)

    def generation_batch_size(self, batch_size: int, kwargs: dict) -> int:
        """Rows ``generate`` will run: it repeats each prompt for beams / returned sequences."""
        config = kwargs.get("generation_config") or self.base_model.generation_config
        num_beams = kwargs.get("num_beams", config.num_beams) or 1
        num_return = kwargs.get("num_return_sequences", config.num_return_sequences) or 1
        return batch_size * max(num_beams, num_return)


def batch_size_of(input_ids: Tensor | None, inputs_embeds: Tensor | None) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0]
    raise ValueError("pass input_ids or inputs_embeds")


def reject_cache(kwargs: dict, method: str) -> None:
    """The virtual tokens start the sequence: a cache passed in would have to come before or after them."""
    for key in ("cache", "past_key_values"):
        if kwargs.get(key) is not None:
            raise UserError(f"{method}: `{key}` cannot be passed in: the wrapper builds the cache itself")


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_value(config, names: tuple[str, ...], what: str) -> int:
    """The first of `names` the config has: architectures name a size differently (n_embd, d_model ...)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise UserError(f"model config has none of {', '.join(names)}: cannot tell the {what} for virtual tokens")


def num_layers_of(model: nn.Module) -> int:
    return config_value(
        text_config(model), ("num_hidden_layers", "num_layers", "n_layer"), "number of layers"
    )


def num_heads_of(model: nn.Module) -> int:
    names = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    return config_value(text_config(model), names, "number of attention heads")


def check_not_seq2seq(model: nn.Module, method: str) -> None:
    if getattr(model.config, "is_encoder_decoder", False):
        raise UserError(
            f"{method} supports decoder-only and encoder-only models; "
            f"{model.config.model_type} is an encoder-decoder model"
        )


# --------------------------------------------------------------------------------------------------
# The classification head (modules_to_save) under HF PEFT's prompt-learning keys


def wrap_heads(base_model: nn.Module, config: MethodConfig, task: str) -> list[str]:
    """Train the classification head in full for sequence classification (and whatever the recipe names)."""
    names, required = saved_modules(config, task)
    return wrap_modules_to_save(base_model, names, required=required)


def heads_state(base_model: nn.Module) -> dict[str, Tensor]:
    """``base_model.<path>.<param>`` per modules_to_save copy, as HF PEFT writes them for prompt learning."""
    return {
        HEAD_KEY_PREFIX + key.removeprefix(KEY_PREFIX): value
        for key, value in modules_to_save_state(base_model).items()
    }


def load_heads_state(base_model: nn.Module, state: dict[str, Tensor]) -> set[str]:
    """Copy saved head weights in; returns the keys it used (in the file's naming)."""
    renamed = {
        KEY_PREFIX + key.removeprefix(HEAD_KEY_PREFIX): key
        for key in state
        if key.startswith(HEAD_KEY_PREFIX) and not key.startswith(KEY_PREFIX)
    }
    used = load_modules_to_save_state(base_model, {new: state[old] for new, old in renamed.items()})
    return {renamed[key] for key in used}


# --------------------------------------------------------------------------------------------------
# Shared parts of the contract functions


def unwrap(model: nn.Module, method: str) -> VirtualTokenModel:
    if not (isinstance(model, VirtualTokenModel) and model.method == method):
        raise AdapterError(
            f"this model carries no {method} adapter (got {type(model).__name__}); inject {method} first"
        )
    return model


def prompt_learning_config(
    model: VirtualTokenModel, token_dim: int, num_attention_heads: int, config: MethodConfig
) -> dict:
    """The fields every HF PEFT prompt-learning config carries."""
    return {
        "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,  # 2 only for encoder-decoder models, which these wrappers refuse
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers_of(model.base_model),
        "modules_to_save": saved_modules(config, model.task)[0] or None,
    }
