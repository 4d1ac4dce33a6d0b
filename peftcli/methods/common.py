"""What every method shares: freezing, finding target modules, swapping them, and `modules_to_save`.

Adapter state dict keys follow HF PEFT's on-disk layout: ``base_model.model.<module path>.<param>``.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from peftcli.errors import UserError, did_you_mean

# The architecture's usual LoRA targets: the same facts HF PEFT ships as its default mapping.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "codegen": ["qkv_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "layoutlm": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}

# Classification heads trained in full by default for sequence classification (HF PEFT's choice too).
CLASSIFIER_HEADS = ["classifier", "score"]

KEY_PREFIX = "base_model.model."


class AdapterError(UserError):
    """An adapter that does not fit the model (missing/unexpected keys, wrong shapes)."""


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output embedding (lm_head) so all-linear can leave it out."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, m in model.named_modules() if out is not None and m is out}


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def match_targets(model: nn.Module, targets: list[str] | str, kinds=(nn.Linear, Conv1D)) -> list[str]:
    """Names of modules of the given types matching `targets`, in model order.

    A list matches a module whose full name equals an entry or ends with ``.`` + entry;
    a string other than ``all-linear`` is a regular expression that must match the full name.
    ``all-linear`` is every Linear/Conv1D except the output head and classification heads.
    No match is an error that lists names that do exist.
    """
    names = [n for n, m in model.named_modules() if n and isinstance(m, kinds)]
    if targets == "all-linear":
        skip = output_head_names(model)
        found = [
            n
            for n in names
            if n not in skip
            and n.rsplit(".", 1)[-1] not in CLASSIFIER_HEADS
            and not any(n.startswith(h + ".") for h in CLASSIFIER_HEADS)
        ]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise UserError(f"method.target_modules: bad regular expression {targets!r}: {e}") from e
        found = [n for n in names if pattern.fullmatch(n)]
    else:
        found = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in found)]
        if missing and found:
            raise UserError(_no_match_message(missing[0], names))
    if not found:
        first = targets if isinstance(targets, str) else targets[0]
        raise UserError(_no_match_message(first, names))
    return found


def _no_match_message(target: str, names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    lead = f"method.target_modules: `{target}` matches no layer"
    return f"{lead}{did_you_mean(target, leaves)}; layer names here: {', '.join(leaves)}"


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a Conv1D (whose weight is stored transposed)."""
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features


# --------------------------------------------------------------------------------------------------
# modules_to_save: a trainable copy of a whole module (e.g. the classification head)


class ModulesToSave(nn.Module):
    """Holds the frozen original and a trainable copy; forward uses the copy.

    Keeping the original mirrors HF PEFT (so parameter totals agree) and lets the base model be
    recovered exactly.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.trained = copy.deepcopy(original)
        for p in self.trained.parameters():
            p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.trained(*args, **kwargs)


def default_modules_to_save(requested: list[str] | None, task: str) -> list[str]:
    if requested is not None:
        return requested
    return list(CLASSIFIER_HEADS) if task == "sequence-classification" else []


def wrap_modules_to_save(model: nn.Module, names: list[str], required: bool = False) -> list[str]:
    """Wrap every module whose name equals or ends with one of `names`; returns the wrapped names."""
    found = [
        n
        for n, m in model.named_modules()
        if n
        and not isinstance(m, ModulesToSave)
        and "original_module" not in n
        and "trained" not in n
        and any(n == t or n.endswith("." + t) for t in names)
    ]
    for name in found:
        set_submodule(model, name, ModulesToSave(model.get_submodule(name)))
    if required and names and not found:
        all_names = [n for n, _ in model.named_modules() if n]
        raise UserError(
            f"method.modules_to_save: `{names[0]}` matches no module"
            + did_you_mean(names[0], [n.rsplit(".", 1)[-1] for n in all_names])
        )
    return found


def modules_to_save_state(model: nn.Module) -> dict[str, Tensor]:
    """HF PEFT's keys: base_model.model.<path>.<param> (the wrapper's internals are not in the key)."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            for pname, p in module.trained.named_parameters():
                state[f"{KEY_PREFIX}{name}.{pname}"] = p.detach()
    return state


def load_modules_to_save_state(model: nn.Module, state: dict[str, Tensor]) -> set[str]:
    """Copy saved head weights in; returns the keys it used."""
    used = set()
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            for pname, p in module.trained.named_parameters():
                key = f"{KEY_PREFIX}{name}.{pname}"
                if key in state:
                    copy_checked(p, state[key], key)
                    used.add(key)
    return used


def copy_checked(param: Tensor, value: Tensor, key: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise AdapterError(
            f"adapter tensor {key} has shape {tuple(value.shape)}, "
            f"the model expects {tuple(param.shape)}: was it trained on another base model?"
        )
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def check_keys(expected: set[str], given: set[str], where: str = "adapter") -> None:
    """Missing or unexpected keys are an error that names a few of them."""
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise AdapterError(f"{where} does not fit this model: " + "; ".join(parts))


def load_state_strict(model: nn.Module, expected: dict[str, nn.Parameter], state: dict[str, Tensor]) -> None:
    """Copy `state` into the method's own parameters (`expected`, by key) and the modules_to_save copies.

    `state` must hold exactly those keys, checked before anything is copied, and each tensor the shape of
    its parameter: either mismatch is an AdapterError. Values are copied in place, so an optimizer built on
    the parameters keeps working (resume).
    """
    check_keys(set(expected) | set(modules_to_save_state(model)), set(state))
    for key, param in expected.items():
        copy_checked(param, state[key], key)
    load_modules_to_save_state(model, state)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), each shared tensor once: HF PEFT's convention."""
    trainable = total = 0
    for p in model.parameters():  # parameters() already yields a shared tensor once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
