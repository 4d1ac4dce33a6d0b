"""`peft generate` and `peft predict`: load a base model plus a trained adapter and run it once.

Generation streams: each new token's text goes to `on_text` as soon as it is decoded (the command prints
it), and the whole answer is returned. Greedy unless sampling is asked for; it stops at the EOS token and,
for a chat prompt, at the template's end-of-turn token (prompt.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from peftcli.errors import UserError
from peftcli.infer.llama import Decoder
from peftcli.infer.load import InferenceInfo, load_adapter_dir, load_for_inference
from peftcli.infer.prompt import encode_prompt, prompt_style, stop_ids
from peftcli.runs.adapter import AdapterDir


def run_generate(
    run_dir: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    base: str | None = None,
    raw: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The completion of `prompt` (new text only, stripped), or the predicted label for a classifier.

    Unless `raw`, the prompt is rendered as the run's training data was (prompt.prompt_style). With
    `sample` and a temperature above 0 it samples (seeded); else it is greedy.
    """
    model, tokenizer, info = load_for_inference(run_dir, base, fold=True)
    if info.task == "sequence-classification":
        text = _format_prediction(*classify(model, tokenizer, info, prompt))
        if on_text:
            on_text(text)
        return text
    style = prompt_style(tokenizer, info.data_format, raw)
    sampling = (
        {"temperature": temperature, "top_p": top_p, "seed": seed} if sample and temperature > 0 else None
    )
    return complete(model, tokenizer, prompt, style, info.device, max_new_tokens, sampling, on_text)


def complete(
    model: nn.Module,
    tokenizer,
    prompt: str,
    style: str,
    device: torch.device,
    max_new_tokens: int = 64,
    sampling: dict | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The new text (stripped) a loaded causal LM writes after `prompt`, put to it in `style` (see
    prompt.prompt_style): greedy, or sampled with `sampling` (see continue_ids)."""
    input_ids, _ = encode_prompt(tokenizer, prompt, style)
    new_ids = continue_ids(
        model, tokenizer, input_ids.to(device), max_new_tokens, stop_ids(tokenizer, style), sampling, on_text
    )
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip()


@torch.no_grad()
def continue_ids(
    model: nn.Module,
    tokenizer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    stop: list[int],
    sampling: dict | None = None,
    on_text: Callable[[str], None] | None = None,
) -> list[int]:
    """The new token ids after `input_ids` (1, seq): greedy, or sampled with `sampling` (temperature, top_p,
    seed); ends at a `stop` id (not returned) or after `max_new_tokens`. Each piece of text goes to
    `on_text` as it is decoded."""
    pieces = TextPieces(tokenizer, on_text, stop) if on_text else None
    if sampling:
        torch.manual_seed(sampling["seed"])  # both draw from the global generator (every device)
    if isinstance(model, Decoder):
        new_ids = model.continue_ids(input_ids, max_new_tokens, stop, sampling, pieces and pieces.add)
        if pieces:
            pieces.end()
    else:
        kwargs = {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else (stop or [0])[0],
            "eos_token_id": stop or None,
            "attention_mask": torch.ones_like(input_ids),
            "streamer": pieces,
        }
        if sampling:
            kwargs.update(do_sample=True, temperature=sampling["temperature"], top_p=sampling["top_p"])
        output = model.generate(input_ids=input_ids, **kwargs)
        new_ids = output[0, input_ids.shape[1] :].tolist()
    while new_ids and new_ids[-1] in stop:
        new_ids.pop()
    return new_ids


class TextPieces:
    """A `generate` streamer: hands each newly decoded piece of text to `on_text`.

    The answer so far is decoded whole each time and the new tail handed on, so a character split over
    several byte-level tokens comes out once complete (a trailing U+FFFD waits). Leading whitespace is
    dropped, as the returned answer is stripped; stop tokens and other special tokens are not shown.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None], stop: list[int]):
        self.tokenizer, self.on_text, self.stop = tokenizer, on_text, set(stop)
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """transformers' streamer call: the prompt first, then each new token."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.add(*value.reshape(-1).tolist())

    def add(self, *ids: int) -> None:
        """New token ids."""
        self.ids.extend(i for i in ids if i not in self.stop)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):
            return
        if len(text) > self.shown:
            self.on_text(text[self.shown :])
            self.shown = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if len(text) > self.shown:
            self.on_text(text[self.shown :])
            self.shown = len(text)


def run_predict(run_dir: str | Path, text: str, base: str | None = None) -> str:
    """'label (p=0.87)' for a sequence-classification adapter."""
    adapter = AdapterDir(run_dir, base)
    if adapter.task != "sequence-classification":
        raise UserError(
            f"{adapter.path} holds a {adapter.task} adapter, not a classifier: "
            f"use `peft generate {adapter.path} --prompt ...`"
        )
    model, tokenizer, info = load_adapter_dir(adapter)
    return _format_prediction(*classify(model, tokenizer, info, text))


def classify(model: nn.Module, tokenizer, info: InferenceInfo, text: str) -> tuple[str, float]:
    """(label, probability) of the most likely class."""
    encoded = tokenizer(
        text, return_tensors="pt", truncation=info.max_length is not None, max_length=info.max_length
    )
    encoded = {k: v.to(info.device) for k, v in encoded.items()}
    with torch.no_grad():
        logits = model(**encoded).logits[0].float()  # (num_labels,)
    probs = logits.softmax(-1)
    index = int(probs.argmax())
    if info.label_names:
        label = info.label_names[index]
    else:
        # a method's wrapper keeps the transformers model as .base_model
        config = getattr(model, "config", None) or getattr(getattr(model, "base_model", None), "config", None)
        label = str((getattr(config, "id2label", None) or {}).get(index, index))
    return label, float(probs[index])


def _format_prediction(label: str, probability: float) -> str:
    return f"{label} (p={probability:.2f})"
