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
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

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

NAME = "prompt-tuning"
PEFT_TYPE = "PROMPT_TUNING"
MERGEABLE = False
WHY_NOT_MERGEABLE = (
    "prompt tuning adds input positions (learned embeddings in front of every input), not a change to any "
    "weight, so it cannot be folded into the base model. Serve the base model with the adapter instead "
    "(`peft generate RUN_DIR`)."
)
# The learning rate a recipe gets when it sets none: HF PEFT's prompt tuning guide for causal LMs trains with
# 3e-2 (Lester et al. 2021 used 0.3 with Adafactor); soft prompts need rates far above LoRA's.
LEARNING_RATE = 3e-2
INIT_NAMES = {"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}  # ours -> HF PEFT's


@dataclass
class Config(MethodConfig):
    name: ClassVar[str] = NAME

    num_virtual_tokens: int = 20
    prompt_init: Literal["random", "text", "vocab"] = "random"
    prompt_init_text: str | None = None  # with prompt_init: text

    def check(self, fail: Fail) -> None:
        check_positive(self, "num_virtual_tokens", fail)
        if self.prompt_init == "text" and not self.prompt_init_text:
            fail("prompt_init_text", "required when method.prompt_init is text")


# --------------------------------------------------------------------------------------------------
# The wrapper's forward and generate


def check_initialised(model: VirtualTokenModel) -> None:
    """Text init without a tokenizer leaves the prompt unset: fine for loading saved weights, an error
    before anything else."""
    if model.missing_init:
        raise UserError(model.missing_init)


def with_prompt(model: VirtualTokenModel, inputs_embeds: Tensor) -> Tensor:
    """(batch, seq, token_dim) -> (batch, num_virtual_tokens + seq, token_dim)."""
    prompt = model.prompt.weight.to(inputs_embeds.dtype)
    prompt = prompt.unsqueeze(0).expand(inputs_embeds.shape[0], -1, -1)
    return torch.cat([prompt, inputs_embeds], dim=1)


def run_forward(model: VirtualTokenModel, input_ids, attention_mask, labels, **kwargs):
    check_initialised(model)
    virtual.reject_cache(kwargs, NAME)
    inputs_embeds = kwargs.pop("inputs_embeds", None)
    batch_size = virtual.batch_size_of(input_ids, inputs_embeds)
    if inputs_embeds is None:
        inputs_embeds = model.base_model.get_input_embeddings()(input_ids)
    prefix = (batch_size, model.num_virtual_tokens)
    if labels is not None and model.task == "causal-lm":
        labels = torch.cat([labels.new_full(prefix, -100), labels], dim=1)  # no loss on the prompt
    if kwargs.get("token_type_ids") is not None:
        token_type_ids = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(prefix), token_type_ids], dim=1)
    if kwargs.get("position_ids") is not None:
        # The prompt takes positions 0 .. P-1 and pushes the real tokens back by P, as generate does.
        # (HF PEFT drops position_ids here instead, with a warning.)
        position_ids = kwargs["position_ids"]
        prompt_positions = torch.arange(model.num_virtual_tokens, device=position_ids.device)
        prompt_positions = prompt_positions.to(position_ids.dtype).expand(position_ids.shape[0], -1)
        kwargs["position_ids"] = torch.cat([prompt_positions, position_ids + model.num_virtual_tokens], dim=1)
    return model.base_model(
        inputs_embeds=with_prompt(model, inputs_embeds),
        attention_mask=model.extend_attention_mask(attention_mask),
        labels=labels,
        **kwargs,
    )


def run_generate(model: VirtualTokenModel, input_ids, attention_mask, **kwargs):
    """The base model's ``generate`` on [prompt; embed(input_ids)]; returns input_ids + new tokens."""
    check_initialised(model)
    virtual.reject_cache(kwargs, NAME)
    inputs_embeds = kwargs.pop("inputs_embeds", None)
    if input_ids is None and inputs_embeds is None:
        raise UserError(f"{NAME}: generate needs input_ids (or inputs_embeds)")
    if inputs_embeds is None:
        inputs_embeds = model.base_model.get_input_embeddings()(input_ids)
    if input_ids is not None:
        mask = model.generation_mask(input_ids, attention_mask, kwargs)
    else:
        rows, length = inputs_embeds.shape[:2]
        mask = attention_mask if attention_mask is not None else inputs_embeds.new_ones(rows, length).long()
    with torch.no_grad():
        inputs_embeds = with_prompt(model, inputs_embeds)
    # Both input_ids and inputs_embeds: the model reads the embeddings, the output starts with input_ids.
    return model.base_model.generate(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=model.extend_attention_mask(mask),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# Initialisation


def init_token_ids(config: Config, vocab_size: int, tokenizer) -> Tensor:
    """(num_virtual_tokens,) ids whose embeddings start the prompt: random ones, or the text's."""
    if config.prompt_init == "vocab":
        return torch.randint(0, vocab_size, (config.num_virtual_tokens,))
    return torch.tensor(text_init_ids(tokenizer, config.prompt_init_text, config.num_virtual_tokens))


def text_init_ids(tokenizer, text: str, num_virtual_tokens: int) -> list[int]:
    """The text's token ids (special tokens too, as in HF PEFT), repeated or cut to num_virtual_tokens."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise UserError(f"method.prompt_init_text: {text!r} gives no tokens")
    return (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]


def find_tokenizer(model):
    """The tokenizer saved next to the model, if there is one (HF PEFT's `tokenizer_name_or_path`)."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not name:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except Exception:  # whatever the reason (no files, an unknown tokenizer class ...), there is none to use
        return None


# --------------------------------------------------------------------------------------------------
# The method contract


def inject(model, config: Config, context: Context) -> VirtualTokenModel:
    """Wrap `model` with a trainable prompt.

    ``prompt_init: text`` needs the model's tokenizer: `context.tokenizer`, else the one saved next to the
    model. Without either, the wrapper can still load saved weights (`load_adapter_state`), but training or
    running it before that is an error.
    """
    virtual.check_not_seq2seq(model, NAME)
    modules.freeze(model)
    weight = model.get_input_embeddings().weight  # (vocab, token_dim)
    # nn.Embedding's own N(0, 1) init is HF PEFT's RANDOM.
    prompt = nn.Embedding(
        config.num_virtual_tokens, weight.shape[1], device=weight.device, dtype=weight.dtype
    )
    on_meta = weight.device.type == "meta"  # a meta model (`peft count`) has no values to copy
    text_init, tokenizer = config.prompt_init == "text", context.tokenizer
    if text_init and tokenizer is None and not on_meta:
        tokenizer = find_tokenizer(model)
    tokenizer_name = getattr(tokenizer, "name_or_path", None) or getattr(model, "name_or_path", None) or None
    missing_init = None
    if text_init and tokenizer is None and not on_meta:
        missing_init = (
            "method.prompt_init: text needs the model's tokenizer to initialise the prompt "
            "(none was passed and none is saved next to the model)"
        )
    elif config.prompt_init != "random" and not on_meta:
        ids = init_token_ids(config, weight.shape[0], tokenizer)
        with torch.no_grad():
            prompt.weight.copy_(weight[ids.to(weight.device)])
    virtual.wrap_heads(model, config, context.task)
    wrapper = virtual.VirtualTokenModel(
        model,
        NAME,
        config.num_virtual_tokens,
        context.task,
        run_forward,
        run_generate,
        "PromptTuningModel",
        prompt=prompt,  # weight: (num_virtual_tokens, token_dim)
        tokenizer_name_or_path=tokenizer_name if text_init else None,
        missing_init=missing_init,
    )
    wrapper.output_offset = config.num_virtual_tokens  # outputs start with the prompt's positions
    return wrapper


def adapter_state(model) -> dict[str, Tensor]:
    wrapper = virtual.unwrap(model, NAME)
    check_initialised(wrapper)
    return {"prompt_embeddings": wrapper.prompt.weight.detach(), **virtual.heads_state(wrapper.base_model)}


def load_adapter_state(model, state: dict[str, Tensor]) -> None:
    wrapper = virtual.unwrap(model, NAME)
    modules.check_keys({"prompt_embeddings", *virtual.heads_state(wrapper.base_model)}, set(state))
    modules.copy_checked(wrapper.prompt.weight, state["prompt_embeddings"], "prompt_embeddings")
    virtual.load_heads_state(wrapper.base_model, state)
    wrapper.missing_init = None


def merge(model):
    raise UserError(f"method {NAME} cannot be merged: {WHY_NOT_MERGEABLE}")


# --------------------------------------------------------------------------------------------------
# Counting from shapes


def count(shapes: Shapes, config: Config, saved: list[str]) -> tuple[int, int]:
    added = config.num_virtual_tokens * shapes.embed_dim
    return added, added


# --------------------------------------------------------------------------------------------------
# adapter_config.json, both ways


def adapter_config(model, config: Config, task: str) -> dict:
    wrapper = virtual.unwrap(model, NAME)
    text = config.prompt_init == "text"
    num_heads = virtual.num_heads_of(wrapper.base_model)
    return {
        **virtual.prompt_learning_config(wrapper, wrapper.prompt.embedding_dim, num_heads, config),
        "prompt_tuning_init": INIT_NAMES[config.prompt_init],
        "prompt_tuning_init_text": config.prompt_init_text if text else None,
        "tokenizer_name_or_path": wrapper.tokenizer_name_or_path if text else None,
        "tokenizer_kwargs": None,
    }


def config_from_adapter(fields: dict) -> Config:
    check_prompt_learning_fields(fields, NAME)
    hf_init = fields.get("prompt_tuning_init") or "RANDOM"
    by_hf_name = {hf: ours for ours, hf in INIT_NAMES.items()}
    if hf_init not in by_hf_name:
        raise UserError(
            f"adapter_config.json: prompt_tuning_init {hf_init!r} is not supported "
            f"(supported: {', '.join(by_hf_name)})"
        )
    init = by_hf_name[hf_init]
    text = fields.get("prompt_tuning_init_text")
    if init == "text" and not text:
        raise UserError(
            "adapter_config.json: prompt_tuning_init is TEXT but prompt_tuning_init_text is empty"
        )
    return Config(
        num_virtual_tokens=fields["num_virtual_tokens"],
        prompt_init=init,
        prompt_init_text=text if init == "text" else None,
        modules_to_save=prompt_learning_modules_to_save(fields),
    )
