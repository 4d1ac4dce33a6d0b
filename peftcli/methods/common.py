"""What every method shares: freezing, finding target modules, swapping them, and `modules_to_save`.

Adapter state dict keys follow HF PEFT's on-disk layout: ``base_model.model.<module path>.<param>``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from peftcli.errors import UserError, did_you_mean
from peftcli.layout import matches, outermost, select_targets

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
    """Names of modules of the given types that `targets` picks, in model order (`layout.select_targets`)."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, kinds)]
    skip = output_head_names(model) if targets == "all-linear" else set()
    return select_targets(names, targets, skip)


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


def wrap_modules_to_save(model: nn.Module, names: list[str], required: bool = False) -> list[str]:
    """Wrap every module whose name equals or ends with one of `names`; returns the wrapped names.

    A match inside another match is left to it: the outer copy trains it.
    """
    found = outermost(
        [
            n
            for n, m in model.named_modules()
            if n
            and not isinstance(m, ModulesToSave)
            and "original_module" not in n
            and "trained" not in n
            and any(matches(n, t) for t in names)
        ]
    )
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
