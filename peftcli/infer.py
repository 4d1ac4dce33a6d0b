"""`peft generate` and `peft predict`: load a base model plus a trained adapter and run it once.

The adapter dir is a `peft train` output dir (adapter files, tokenizer, recipe.yaml, labels.json at
its root) or a bare adapter dir, ours or HF PEFT's (no tokenizer: the base model's is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftcli.data.render import PLAIN_PROMPT
from peftcli.errors import UserError
from peftcli.runs.adapter import AdapterDir

CHAT_FORMATS = ("chat", "instruction")  # data formats rendered with the chat template (when there is one)


@dataclass(frozen=True)
class InferenceInfo:
    run_dir: Path
    base: str  # the base model as loaded (--base or the adapter's base_model_name_or_path)
    task: str  # causal-lm | sequence-classification
    method: str  # the peftcli method name, e.g. lora
    label_names: list[str] | None  # classification labels in id order, when the run saved them
    data_format: str | None  # recipe.yaml's data.format; None for a bare adapter dir
    max_length: int | None  # recipe.yaml's data.max_length: longer text to classify is truncated
    device: torch.device


def load_for_inference(
    run_dir: str | Path, base: str | None = None
) -> tuple[nn.Module, object, InferenceInfo]:
    """(model with the adapter loaded, in eval mode; tokenizer; InferenceInfo)."""
    return _load(AdapterDir(run_dir, base))


def _load(adapter: AdapterDir) -> tuple[nn.Module, object, InferenceInfo]:
    recipe = adapter.recipe
    model = adapter.load_model()  # the run's dtype and quantization, as trained
    tokenizer = adapter.load_tokenizer()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    info = InferenceInfo(
        run_dir=adapter.path,
        base=adapter.base,
        task=adapter.task,
        method=adapter.method.name,
        label_names=adapter.label_names,
        data_format=recipe.data.format if recipe else None,
        max_length=recipe.data.max_length if recipe else _tokenizer_limit(tokenizer),
        device=device,
    )
    return model, tokenizer, info


def _tokenizer_limit(tokenizer) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None  # else: transformers' "no limit"


# --------------------------------------------------------------------------------------------------
# Commands


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
) -> str:
    """The completion of `prompt` (new text only), or the predicted label for a classifier.

    Greedy unless `sample` (with temperature 0, sampling is greedy too). Unless `raw`, the prompt is
    rendered as the run's training data was: through the chat template when the tokenizer has one and
    the run trained on chat or instruction data (a bare adapter dir: whenever there is a template), in
    data.py's plain instruction prompt for instruction data without a template.
    """
    model, tokenizer, info = load_for_inference(run_dir, base)
    if info.task == "sequence-classification":
        return _format_prediction(*classify(model, tokenizer, info, prompt))
    input_ids, attention_mask = encode_prompt(tokenizer, prompt, prompt_style(tokenizer, info, raw))
    input_ids, attention_mask = input_ids.to(info.device), attention_mask.to(info.device)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    if sample and temperature > 0:
        torch.manual_seed(seed)  # generate() draws from the global generator (every device)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    new_tokens = output[0, input_ids.shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def run_predict(run_dir: str | Path, text: str, base: str | None = None) -> str:
    """'label (p=0.87)' for a sequence-classification adapter."""
    adapter = AdapterDir(run_dir, base)
    if adapter.task != "sequence-classification":
        raise UserError(
            f"{adapter.path} holds a {adapter.task} adapter, not a classifier: "
            f"use `peft generate {adapter.path} --prompt ...`"
        )
    model, tokenizer, info = _load(adapter)
    return _format_prediction(*classify(model, tokenizer, info, text))


def prompt_style(tokenizer, info: InferenceInfo, raw: bool) -> str:
    """How the prompt is put to the model, the way the run's training data was rendered:
    "chat" (the chat template), "instruction" (data.py's plain prompt, for instruction data and a
    tokenizer without a template) or "raw"."""
    if raw:
        return "raw"
    if getattr(tokenizer, "chat_template", None):
        return "chat" if info.data_format is None or info.data_format in CHAT_FORMATS else "raw"
    return "instruction" if info.data_format == "instruction" else "raw"


def encode_prompt(tokenizer, prompt: str, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (1, seq), for a prompt_style."""
    if style == "chat":
        # Render to text, then tokenize: apply_chat_template's tokenized return type differs between
        # transformers versions (a tensor in 4.x, a BatchEncoding in 5.x). The template writes its own
        # BOS, so the tokenizer adds none, as in training.
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
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
