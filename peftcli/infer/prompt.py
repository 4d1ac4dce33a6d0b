"""How a prompt (or a conversation) is put to a model, the way the run's training data was rendered, and
where its answer ends.

The styles: "chat" (the tokenizer's chat template), "instruction" (data/render.py's plain prompt, for
instruction data and a tokenizer without a template) and "raw" (the text as it is).
"""

from __future__ import annotations

import torch

from peftcli.data.render import PLAIN_PROMPT
from peftcli.errors import UserError

# data formats rendered with the chat template (when there is one)
CHAT_FORMATS = ("chat", "instruction", "preference", "kto")


def prompt_style(tokenizer, data_format: str | None, raw: bool) -> str:
    """How the prompt is put to the model, the way the run's training data (of `data_format`; None: a bare
    adapter dir) was rendered: "chat" (the chat template), "instruction" (the plain instruction prompt, for
    instruction data and a tokenizer without a template) or "raw"."""
    if raw:
        return "raw"
    if getattr(tokenizer, "chat_template", None):
        return "chat" if data_format is None or data_format in CHAT_FORMATS else "raw"
    return "instruction" if data_format == "instruction" else "raw"


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The conversation through the chat template, the assistant's turn opened; UserError where the
    template refuses it (its raise_exception(), or an error inside it)."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja2's errors, and whatever a template's own calls raise
        raise UserError(
            f"the run's chat template refused the prompt: {e} (`peft generate --raw` puts it as it is)"
        ) from e


def encode_prompt(tokenizer, prompt: str, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (1, seq), for a prompt_style."""
    if style == "chat":
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    if style == "instruction":
        prompt = PLAIN_PROMPT.format(instruction=prompt, input="")
    encoded = tokenizer(prompt, return_tensors="pt")
    input_ids = encoded["input_ids"]
    if input_ids.shape[1] == 0:
        if tokenizer.bos_token_id is None:
            raise UserError("--prompt is empty and the tokenizer has no BOS token to start from")
        input_ids = torch.tensor([[tokenizer.bos_token_id]])
        return input_ids, torch.ones_like(input_ids)
    return input_ids, encoded.get("attention_mask", torch.ones_like(input_ids))


def encode_chat(tokenizer, messages: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a conversation. Rendered to text, then tokenized: apply_chat_template's
    tokenized return type differs between transformers versions. The template writes its own BOS, so the
    tokenizer adds none, as in training."""
    encoded = tokenizer(render_chat(tokenizer, messages), add_special_tokens=False, return_tensors="pt")
    input_ids = encoded["input_ids"]
    return input_ids, encoded.get("attention_mask", torch.ones_like(input_ids))


def end_of_turn_id(tokenizer) -> int | None:
    """The token that ends an assistant turn in the chat template (<|im_end|>, <|eot_id|> ...), found by
    rendering a two-turn conversation and reading the first special token after the reply; None without a
    template, or where the reply is not followed by one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    reply = "peftcli-reply"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}], tokenize=False
        )
    except Exception:  # a template that wants other roles or fields: no end-of-turn token known
        return None
    tail = text[text.rfind(reply) + len(reply) :]
    special = set(tokenizer.all_special_ids) | {
        index for index, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    for index in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if index in special:
            return index
    return None


def stop_ids(tokenizer, style: str) -> list[int]:
    """Where an answer ends: the EOS token, and in chat style the template's end-of-turn token too (a model
    trained on chat data ends its turn there, whatever its EOS)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    turn_end = end_of_turn_id(tokenizer) if style == "chat" else None
    if turn_end is not None and turn_end not in ids:
        ids.append(turn_end)
    return ids
