"""What prefix tuning and prompt tuning share: a wrapper around the frozen base model adding virtual tokens.

Neither method changes a layer, so neither can be swapped in place. `VirtualTokenModel` keeps the base model
as ``.base_model``, answers what a training loop or ``generate`` asks of a model (``config``, ``device``,
``generation_config``, ``get_input_embeddings`` ...) by asking the base model, and holds the helpers both
methods need: the attention mask grown by the virtual tokens, the batch size a ``generate`` call will reach,
and the classification head's state under HF PEFT's prompt-learning keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peftcli.errors import UserError
from peftcli.layout import default_modules_to_save
from peftcli.methods.common import (
    KEY_PREFIX,
    AdapterError,
    load_modules_to_save_state,
    modules_to_save_state,
    wrap_modules_to_save,
)
from peftcli.recipe import MethodSection

# HF PEFT stores a prompt-learning model's head under `base_model.<path>`: its base_model is the transformers
# model itself, not a tuner wrapping it as for LoRA (`base_model.model.<path>`).
HEAD_KEY_PREFIX = "base_model."


class VirtualTokenModel(nn.Module):
    """A frozen base model plus `num_virtual_tokens` trainable tokens that every input sees first.

    Subclasses implement ``forward`` and ``generate``; anything else is looked up on the base model, so a
    training loop can call ``model.config`` or ``model.get_input_embeddings()`` as it would on the base.
    """

    def __init__(self, base_model: nn.Module, num_virtual_tokens: int, task: str):
        super().__init__()
        self.base_model = base_model
        self.num_virtual_tokens = num_virtual_tokens
        self.task = task
        # Leading positions of the outputs (logits, hidden states) that belong to virtual tokens: a loop that
        # computes its own loss from them drops these first.
        self.output_offset = 0

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules
        except AttributeError:
            if name == "base_model":  # not set yet: do not recurse
                raise
            return getattr(self.base_model, name)

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


def wrap_heads(base_model: nn.Module, method: MethodSection, task: str) -> list[str]:
    """Train the classification head in full for sequence classification (and whatever the recipe names)."""
    names = default_modules_to_save(method.modules_to_save, task)
    return wrap_modules_to_save(base_model, names, required=method.modules_to_save is not None)


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


def config_modules_to_save(method: MethodSection, task: str) -> list[str] | None:
    names = default_modules_to_save(method.modules_to_save, task)
    return names or None


def modules_to_save_from_config(config: dict, task_type: str | None) -> list[str] | None:
    """HF PEFT appends the classifier names once more on every load of a SEQ_CLS adapter: drop the repeats."""
    names = config.get("modules_to_save")
    if names is None:
        return None
    unique = list(dict.fromkeys(names))
    # Our own default for sequence classification: keep the recipe's "not set" meaning.
    if task_type == "SEQ_CLS" and unique == ["classifier", "score"]:
        return None
    return unique


# --------------------------------------------------------------------------------------------------
# Shared parts of the contract functions


def unwrap(model: nn.Module, cls: type, method: str) -> VirtualTokenModel:
    if not isinstance(model, cls):
        raise AdapterError(
            f"this model carries no {method} adapter (got {type(model).__name__}); inject {method} first"
        )
    return model


def prompt_learning_config(
    model: VirtualTokenModel, token_dim: int, num_attention_heads: int, method: MethodSection
) -> dict:
    """The fields every HF PEFT prompt-learning config carries."""
    return {
        "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,  # 2 only for encoder-decoder models, which these wrappers refuse
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers_of(model.base_model),
        "modules_to_save": config_modules_to_save(method, model.task),
    }


def check_prompt_learning_config(config: dict, method: str) -> None:
    """Refuse what would change the math here: two virtual-token sets (encoder-decoder models)."""
    submodules = config.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise UserError(
            f"adapter_config.json: num_transformer_submodules={submodules} (an encoder-decoder "
            f"{method} adapter) is not supported; only 1"
        )
    num_virtual_tokens = config.get("num_virtual_tokens")
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0:
        raise UserError(
            f"adapter_config.json: num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}"
        )
