"""BitFit: train only the bias terms — Ben Zaken et al. 2021, arXiv:2106.10199.

Every weight matrix stays frozen; the biases the model already has become the only trainable
parameters (with the classification head, trained in full for sequence classification). Nothing is
added, so the trained model *is* the base model with new biases: merging is just dropping the
bookkeeping, and the adapter file's keys are the base model's own parameter names under
``base_model.model.``.

Which biases: ``method.biases: all`` trains every bias, LayerNorm biases included (the paper's BitFit
trains all bias terms of the encoder, the LayerNorm ones among them). A list trains the biases of the
modules it names, each entry an exact module name or a `.`-suffix (``query``, ``intermediate.dense``,
``c_attn``).

Modules trained in full (``modules_to_save``, the classification head by default) are left out of the
bias selection: their biases train and save with the head, under the same key a BitFit bias would have
(``base_model.model.classifier.bias``), so selecting them twice would make that key ambiguous.

HF PEFT has no BitFit; the files use its layout with a ``peft_type`` of our own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from peftcli.lazy import LazyModule, nn
from peftcli.methods import layout
from peftcli.methods.base import (
    Context,
    Fail,
    MethodConfig,
    adapter_field_error,
    is_str_list,
    modules_to_save_field,
    saved_modules,
)

if TYPE_CHECKING:
    from torch import Tensor

    from peftcli.models.shapes import Shapes

modules = LazyModule("peftcli.methods.modules")

NAME = "bitfit"
PEFT_TYPE = "BITFIT"
MERGEABLE = True
# The learning rate a recipe gets when it sets none: the top of the paper's sweep (1e-4 to 1e-3, picked per
# task); a few thousand biases move slowly at the rates LoRA uses.
LEARNING_RATE = 1e-3

# The names of the trained bias-owning modules, kept on the model: which biases are "the adapter" is
# not visible in the module tree (nothing is wrapped), and requires_grad is too easily changed by others.
_SELECTED = "peftcli_bitfit_modules"
# Frozen copies of the selected biases as the base model had them ({module name: tensor}, a plain attribute:
# in no state dict, no parameter count), so `disabled` can compute as the base model: the biases train in
# place.
_ORIGINAL = "peftcli_bitfit_original_biases"


@dataclass
class Config(MethodConfig):
    name: ClassVar[str] = NAME
    ACCEPTS: ClassVar[dict[str, str]] = {
        **MethodConfig.ACCEPTS,
        "biases": "all, or a list of bias groups / module names like [query, intermediate.dense]",
    }
    HEADS_REQUIRED: ClassVar[bool] = True

    # "all", or a list of bias groups / module name suffixes, e.g. [query, intermediate.dense]
    biases: list[str] | str = field(default="all")

    def check(self, fail: Fail) -> None:
        if isinstance(self.biases, str) and self.biases != "all":
            fail(
                "biases", f"expected all or a list, got {self.biases!r} (for one group write [{self.biases}])"
            )


def bias_modules(model) -> list[str]:
    """Names of modules that own a bias, in model order, leaving out modules trained in full.

    A bias shared by two modules (tied) is listed once, under its first owner: one tensor, one key.
    """
    saved = modules.saved_module_names(model)
    owners, seen = [], set()
    for name, module in model.named_modules():
        bias = dict(module.named_parameters(recurse=False)).get("bias")
        if bias is None or id(bias) in seen or layout.inside(name, saved):
            continue
        seen.add(id(bias))
        owners.append(name)
    return owners


def select_biases(model, biases: list[str] | str) -> list[str]:
    """The bias-owning modules that `biases` names: "all", or exact names / `.`-suffixes."""
    model_type = getattr(getattr(model, "config", None), "model_type", "this model")
    return layout.select_biases(bias_modules(model), biases, model_type)


# --------------------------------------------------------------------------------------------------
# The method contract


def inject(model, config: Config, context: Context):
    """Freeze `model`, unfreeze the selected biases and train the head in full; returns `model`."""
    modules.freeze(model)
    # Wrap the head first so its bias is the head's, not BitFit's (see the module docstring).
    modules.wrap_modules_to_save(model, *saved_modules(config, context.task))
    selected = select_biases(model, config.biases)
    for name in selected:
        model.get_submodule(name).bias.requires_grad_(True)
    setattr(model, _SELECTED, selected)
    setattr(model, _ORIGINAL, {name: model.get_submodule(name).bias.detach().clone() for name in selected})
    return model


@contextlib.contextmanager
def disabled(model) -> Iterator:
    """The base model's own biases, frozen, in place of the trained ones (and the original head) within the
    block. The trained bias parameters are set aside, not changed, and put back on exit: an optimizer holding
    them still finds them."""
    original = getattr(model, _ORIGINAL, None)
    if original is None:
        raise modules.AdapterError("the model was not prepared for BitFit: inject it before disabling it")
    owners = {name: model.get_submodule(name) for name in _selected(model)}
    trained = {name: owner._parameters["bias"] for name, owner in owners.items()}
    for name, owner in owners.items():
        bias = trained[name]
        owner._parameters["bias"] = nn.Parameter(
            original[name].to(device=bias.device, dtype=bias.dtype), requires_grad=False
        )
    try:
        with modules.disabled(model):
            yield model
    finally:
        for name, owner in owners.items():
            owner._parameters["bias"] = trained[name]


def _selected(model) -> list[str]:
    if not hasattr(model, _SELECTED):
        raise modules.AdapterError(
            "the model was not prepared for BitFit: inject it before saving or loading biases"
        )
    return getattr(model, _SELECTED)


def _bias_parameters(model) -> dict[str, nn.Parameter]:
    """`base_model.model.<module>.bias` (the base model's own names) -> the bias, for each trained bias."""
    return {f"{modules.KEY_PREFIX}{name}.bias": model.get_submodule(name).bias for name in _selected(model)}


def adapter_state(model) -> dict[str, Tensor]:
    """The trained biases plus the head."""
    state = {key: p.detach() for key, p in _bias_parameters(model).items()}
    state.update(modules.modules_to_save_state(model))
    return state


def load_adapter_state(model, state: dict[str, Tensor]) -> None:
    modules.load_state_strict(model, _bias_parameters(model), state)


def merge(model):
    """The plain model: the biases are already in place; each head wrapper gives way to its trained copy."""
    modules.unwrap_modules_to_save(model)
    for attribute in (_SELECTED, _ORIGINAL):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model


# --------------------------------------------------------------------------------------------------
# Counting from shapes


def count(shapes: Shapes, config: Config, saved: list[str]) -> tuple[int, int]:
    """(trainable, added): the selected biases train; nothing is added."""
    owners = [n for n in shapes.bias_owners() if not layout.inside(n, saved)]
    chosen = layout.select_biases(owners, config.biases, shapes.model_type)
    return sum(shapes.params[f"{n}.bias"][1] for n in chosen), 0


# --------------------------------------------------------------------------------------------------
# adapter_config.json, both ways


def adapter_config(model, config: Config, task: str) -> dict:
    return {
        "biases": config.biases,
        # The resolved modules, so loading trains exactly these whatever `all` means on another version.
        "target_modules": list(_selected(model)),
        "modules_to_save": saved_modules(config, task)[0],
    }


def config_from_adapter(fields: dict) -> Config:
    """The Config that rebuilds a saved BitFit adapter; fields we do not know are ignored."""
    targets = fields.get("target_modules")
    if targets is not None:
        if not is_str_list(targets) or not targets:
            raise adapter_field_error(
                "target_modules", f"expected a non-empty list of module names, got {targets!r}"
            )
        biases = targets  # full module names: an exact match each
    else:
        biases = fields.get("biases", "all")
        if biases != "all" and not (is_str_list(biases) and biases):
            raise adapter_field_error(
                "biases", f"expected `all` or a non-empty list of module names, got {biases!r}"
            )
    return Config(biases=biases, modules_to_save=modules_to_save_field(fields))
