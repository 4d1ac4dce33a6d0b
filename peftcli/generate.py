"""`peft generate` and `peft predict`: load a base model plus a trained adapter and run it once.

The adapter dir is a `peft train` output dir (adapter files, tokenizer, recipe.yaml, labels.json at
its root) or a bare adapter dir, ours or HF PEFT's (no tokenizer: the base model's is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from peftcli import checkpoint, models
from peftcli.errors import UserError

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
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
    run_dir = Path(run_dir)
    config, state = checkpoint.read_adapter(run_dir)
    return _load(run_dir, base, config, state)


def _load(run_dir: Path, base: str | None, config: dict, state: dict[str, torch.Tensor]):
    base_name = base or config.get("base_model_name_or_path")
    if not base_name:
        raise UserError(
            f"{run_dir / checkpoint.CONFIG_NAME} names no base model "
            "(base_model_name_or_path is empty): pass --base MODEL"
        )
    task = checkpoint.task_of(config)
    recipe = _read_recipe(run_dir)
    model_section = recipe.get("model") if isinstance(recipe.get("model"), dict) else {}
    label_names = checkpoint.read_labels(run_dir) if task == "sequence-classification" else None
    num_labels = None
    if task == "sequence-classification" and not label_names:
        num_labels = num_labels_from_head(state)
    dtype = model_section.get("dtype")
    revision = config.get("revision") or model_section.get("revision")
    # trust_remote_code is never taken from a run dir: a copied run dir must not run code by itself.
    where = "--base" if base else checkpoint.CONFIG_NAME
    try:
        model = models.load_model(
            base_name,
            task,
            label_names=label_names,
            num_labels=num_labels,
            dtype=dtype if dtype in models.DTYPES else "auto",
            revision=revision,
        )
        if any((run_dir / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = _load_tokenizer_dir(run_dir)
        else:
            tokenizer = models.load_tokenizer(base_name, revision=revision)
    except UserError as e:
        message = str(e).removeprefix("model.name: ")
        hint = "" if base else "; pass --base MODEL to use another copy of the base model"
        raise UserError(f"base model `{base_name}` (from {where}): {message}{hint}") from e
    model, method = checkpoint.load_adapter(model, run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    info = InferenceInfo(
        run_dir=run_dir,
        base=base_name,
        task=task,
        method=method.name,
        label_names=label_names,
        data_format=_data_format(recipe),
        max_length=_max_length(recipe, tokenizer),
        device=device,
    )
    return model, tokenizer, info


def _read_recipe(run_dir: Path) -> dict:
    """The run's recipe.yaml as plain data ({} when absent or unreadable).

    Not `load_recipe`: its checks (e.g. that the training data exists) do not hold where a run dir
    is used later, and only a few keys matter here.
    """
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _data_format(recipe: dict) -> str | None:
    data = recipe.get("data")
    value = data.get("format") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _max_length(recipe: dict, tokenizer) -> int | None:
    data = recipe.get("data")
    value = data.get("max_length") if isinstance(data, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None  # else: transformers' "no limit"


def num_labels_from_head(state: dict[str, torch.Tensor]) -> int | None:
    """The number of labels from the saved classification head: rows of its last weight matrix.

    Keys look like ``base_model.model.score.weight`` (decoders), ``...classifier.weight`` (BERT) or
    ``...classifier.out_proj.weight`` (RoBERTa, whose ``classifier.dense`` comes first).
    """
    from peftcli.layout import CLASSIFIER_HEADS

    best = None
    for key, tensor in sorted(state.items()):
        parts = key.split(".")
        if parts[-1] != "weight" or tensor.ndim != 2 or not any(h in parts[:-1] for h in CLASSIFIER_HEADS):
            continue
        if parts[-2] in CLASSIFIER_HEADS or parts[-2] == "out_proj":
            best = tensor.shape[0]
    return best


def _load_tokenizer_dir(directory: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer saved in {directory}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
    run_dir = Path(run_dir)
    config, state = checkpoint.read_adapter(run_dir)
    if checkpoint.task_of(config) != "sequence-classification":
        raise UserError(
            f"{run_dir} holds a {checkpoint.task_of(config)} adapter, not a classifier: "
            f"use `peft generate {run_dir} --prompt ...`"
        )
    model, tokenizer, info = _load(run_dir, base, config, state)
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
            from peftcli.data import PLAIN_PROMPT

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
