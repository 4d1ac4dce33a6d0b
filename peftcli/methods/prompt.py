"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): trainable embeddings in front of every input.

    inputs_embeds = [prompt; embed(input_ids)],   prompt: (num_virtual_tokens, token_dim)

Only the prompt (and a classification head) trains. The model then reads num_virtual_tokens more positions:
the attention mask grows by that many ones in front, causal-LM labels by that many -100 (no loss on the
prompt), and the outputs (logits, hidden states) have num_virtual_tokens extra leading positions (as HF's).

Initialisation (`method.prompt_init`): ``random`` is nn.Embedding's N(0, 1); ``vocab`` copies the embeddings
of num_virtual_tokens random vocabulary ids; ``text`` copies the embeddings of `prompt_init_text`'s tokens,
repeated or cut to num_virtual_tokens (Lester et al. found initialising from real words trains better).
Saved as HF PEFT does: ``prompt_embeddings`` of shape (num_virtual_tokens, token_dim).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from peftcli.errors import UserError
from peftcli.methods.common import check_keys, copy_checked, freeze
from peftcli.methods.virtual import (
    VirtualTokenModel,
    batch_size_of,
    check_not_seq2seq,
    check_prompt_learning_config,
    heads_state,
    load_heads_state,
    modules_to_save_from_config,
    num_heads_of,
    prompt_learning_config,
    reject_cache,
    unwrap,
    wrap_heads,
)
from peftcli.recipe import MethodSection

PEFT_TYPE = "PROMPT_TUNING"
MERGEABLE = False
WHY_NOT_MERGEABLE = (
    "prompt tuning adds input positions (learned embeddings in front of every input), not a change to any "
    "weight, so it cannot be folded into the base model. Serve the base model with the adapter instead "
    "(`peft generate --adapter DIR`)."
)
METHOD = "prompt-tuning"
INIT_NAMES = {"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}  # ours -> HF PEFT's


class PromptTuningModel(VirtualTokenModel):
    """The frozen base model reading a trainable prompt before every input."""

    def __init__(
        self,
        base_model: nn.Module,
        prompt: nn.Embedding,
        task: str,
        tokenizer_name_or_path: str | None = None,
    ):
        super().__init__(base_model, prompt.num_embeddings, task)
        self.prompt = prompt  # weight: (num_virtual_tokens, token_dim)
        self.output_offset = prompt.num_embeddings  # outputs start with the prompt's positions
        self.tokenizer_name_or_path = tokenizer_name_or_path
        # Set when text init had no tokenizer: fine for loading saved weights, an error before anything else.
        self.missing_init: str | None = None

    def check_initialised(self) -> None:
        if self.missing_init:
            raise UserError(self.missing_init)

    def with_prompt(self, inputs_embeds: Tensor) -> Tensor:
        """(batch, seq, token_dim) -> (batch, num_virtual_tokens + seq, token_dim)."""
        prompt = self.prompt.weight.to(inputs_embeds.dtype)
        prompt = prompt.unsqueeze(0).expand(inputs_embeds.shape[0], -1, -1)
        return torch.cat([prompt, inputs_embeds], dim=1)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs,
    ):
        self.check_initialised()
        reject_cache(kwargs, METHOD)
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        batch_size = batch_size_of(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        prefix = (batch_size, self.num_virtual_tokens)
        if labels is not None and self.task == "causal-lm":
            labels = torch.cat([labels.new_full(prefix, -100), labels], dim=1)  # no loss on the prompt
        if kwargs.get("token_type_ids") is not None:
            token_type_ids = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(prefix), token_type_ids], dim=1)
        if kwargs.get("position_ids") is not None:
            # The prompt takes positions 0 .. P-1 and pushes the real tokens back by P, as generate does.
            # (HF PEFT drops position_ids here instead, with a warning.)
            position_ids = kwargs["position_ids"]
            prompt_positions = torch.arange(self.num_virtual_tokens, device=position_ids.device)
            prompt_positions = prompt_positions.to(position_ids.dtype).expand(position_ids.shape[0], -1)
            kwargs["position_ids"] = torch.cat(
                [prompt_positions, position_ids + self.num_virtual_tokens], dim=1
            )
        return self.base_model(
            inputs_embeds=self.with_prompt(inputs_embeds),
            attention_mask=self.extend_attention_mask(attention_mask),
            labels=labels,
            **kwargs,
        )

    def generate(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **kwargs):
        """The base model's ``generate`` on [prompt; embed(input_ids)]; returns input_ids + new tokens."""
        self.check_initialised()
        reject_cache(kwargs, METHOD)
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        if input_ids is None and inputs_embeds is None:
            raise UserError(f"{METHOD}: generate needs input_ids (or inputs_embeds)")
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        if input_ids is not None:
            mask = self.generation_mask(input_ids, attention_mask, kwargs)
        else:
            rows, length = inputs_embeds.shape[:2]
            mask = (
                attention_mask if attention_mask is not None else inputs_embeds.new_ones(rows, length).long()
            )
        with torch.no_grad():
            inputs_embeds = self.with_prompt(inputs_embeds)
        # Both input_ids and inputs_embeds: the model reads the embeddings, the output starts with input_ids.
        return self.base_model.generate(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=self.extend_attention_mask(mask),
            **kwargs,
        )


# --------------------------------------------------------------------------------------------------
# Initialisation


def init_token_ids(method: MethodSection, vocab_size: int, tokenizer) -> Tensor:
    """(num_virtual_tokens,) ids whose embeddings start the prompt: random ones, or the text's."""
    if method.prompt_init == "vocab":
        return torch.randint(0, vocab_size, (method.num_virtual_tokens,))
    return torch.tensor(text_init_ids(tokenizer, method.prompt_init_text, method.num_virtual_tokens))


def text_init_ids(tokenizer, text: str, num_virtual_tokens: int) -> list[int]:
    """The text's token ids (special tokens too, as in HF PEFT), repeated or cut to num_virtual_tokens."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise UserError(f"method.prompt_init_text: {text!r} gives no tokens")
    return (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]


def find_tokenizer(model: nn.Module):
    """The tokenizer saved next to the model, if there is one (HF PEFT's `tokenizer_name_or_path`)."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not name:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # whatever the reason (no files, an unknown tokenizer class ...), there is none to use
        return None


# --------------------------------------------------------------------------------------------------
# The method contract


def inject(model: nn.Module, method: MethodSection, task: str, tokenizer=None) -> PromptTuningModel:
    """Wrap `model` with a trainable prompt.

    ``prompt_init: text`` needs the model's tokenizer: pass it as `tokenizer`, else the one saved next to the
    model is used. Without either, the wrapper can still load saved weights (`load_adapter_state`), but
    training or running it before that is an error.
    """
    check_not_seq2seq(model, METHOD)
    freeze(model)
    weight = model.get_input_embeddings().weight  # (vocab, token_dim)
    # nn.Embedding's own N(0, 1) init is HF PEFT's RANDOM.
    prompt = nn.Embedding(
        method.num_virtual_tokens, weight.shape[1], device=weight.device, dtype=weight.dtype
    )
    on_meta = weight.device.type == "meta"  # a meta model (`peft count`) has no values to copy
    text_init = method.prompt_init == "text"
    if text_init and tokenizer is None and not on_meta:
        tokenizer = find_tokenizer(model)
    tokenizer_name = getattr(tokenizer, "name_or_path", None) or getattr(model, "name_or_path", None) or None
    wrapper = PromptTuningModel(model, prompt, task, tokenizer_name if text_init else None)
    if text_init and tokenizer is None and not on_meta:
        wrapper.missing_init = (
            "method.prompt_init: text needs the model's tokenizer to initialise the prompt "
            "(none was passed and none is saved next to the model)"
        )
    elif method.prompt_init != "random" and not on_meta:
        ids = init_token_ids(method, weight.shape[0], tokenizer)
        with torch.no_grad():
            prompt.weight.copy_(weight[ids.to(weight.device)])
    wrap_heads(model, method, task)
    return wrapper


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    wrapper = unwrap(model, PromptTuningModel, METHOD)
    wrapper.check_initialised()
    return {"prompt_embeddings": wrapper.prompt.weight.detach(), **heads_state(wrapper.base_model)}


def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    wrapper = unwrap(model, PromptTuningModel, METHOD)
    check_keys({"prompt_embeddings", *heads_state(wrapper.base_model)}, set(state))
    copy_checked(wrapper.prompt.weight, state["prompt_embeddings"], "prompt_embeddings")
    load_heads_state(wrapper.base_model, state)
    wrapper.missing_init = None


def adapter_config(model: nn.Module, method: MethodSection, task: str) -> dict:
    wrapper = unwrap(model, PromptTuningModel, METHOD)
    text = method.prompt_init == "text"
    return {
        **prompt_learning_config(
            wrapper, wrapper.prompt.embedding_dim, num_heads_of(wrapper.base_model), method
        ),
        "prompt_tuning_init": INIT_NAMES[method.prompt_init],
        "prompt_tuning_init_text": method.prompt_init_text if text else None,
        "tokenizer_name_or_path": wrapper.tokenizer_name_or_path if text else None,
        "tokenizer_kwargs": None,
    }


def method_from_config(config: dict) -> MethodSection:
    check_prompt_learning_config(config, METHOD)
    hf_init = config.get("prompt_tuning_init") or "RANDOM"
    by_hf_name = {hf: ours for ours, hf in INIT_NAMES.items()}
    if hf_init not in by_hf_name:
        raise UserError(
            f"adapter_config.json: prompt_tuning_init {hf_init!r} is not supported "
            f"(supported: {', '.join(by_hf_name)})"
        )
    init = by_hf_name[hf_init]
    text = config.get("prompt_tuning_init_text")
    if init == "text" and not text:
        raise UserError(
            "adapter_config.json: prompt_tuning_init is TEXT but prompt_tuning_init_text is empty"
        )
    return MethodSection(
        name=METHOD,
        num_virtual_tokens=config["num_virtual_tokens"],
        prompt_init=init,
        prompt_init_text=text if init == "text" else None,
        modules_to_save=modules_to_save_from_config(config, config.get("task_type")),
    )
