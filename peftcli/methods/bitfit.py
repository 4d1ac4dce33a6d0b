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

from torch import Tensor, nn

from peftcli import layout
from peftcli.errors import UserError
from peftcli.layout import default_modules_to_save
from peftcli.methods.common import (
    KEY_PREFIX,
    AdapterError,
    ModulesToSave,
    freeze,
    load_state_strict,
    modules_to_save_state,
    set_submodule,
    wrap_modules_to_save,
)
from peftcli.recipe import MethodSection

PEFT_TYPE = "BITFIT"
MERGEABLE = True

# The names of the trained bias-owning modules, kept on the model: which biases are "the adapter" is
# not visible in the module tree (nothing is wrapped), and requires_grad is too easily changed by others.
_SELECTED = "peftcli_bitfit_modules"


def bias_modules(model: nn.Module) -> list[str]:
    """Names of modules that own a bias, in model order, leaving out modules trained in full.

    A bias shared by two modules (tied) is listed once, under its first owner: one tensor, one key.
    """
    saved = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    owners, seen = [], set()
    for name, module in model.named_modules():
        bias = dict(module.named_parameters(recurse=False)).get("bias")
        if bias is None or id(bias) in seen or any(name == s or name.startswith(s + ".") for s in saved):
            continue
        seen.add(id(bias))
        owners.append(name)
    return owners


def select_biases(model: nn.Module, biases: list[str] | str) -> list[str]:
    """The bias-owning modules that `biases` names: "all", or exact names / `.`-suffixes."""
    model_type = getattr(getattr(model, "config", None), "model_type", "this model")
    return layout.select_biases(bias_modules(model), biases, model_type)


# --------------------------------------------------------------------------------------------------
# The method contract


def inject(model: nn.Module, method: MethodSection, task: str) -> nn.Module:
    """Freeze `model`, unfreeze the selected biases and train the head in full; returns `model`."""
    freeze(model)
    requested = default_modules_to_save(method.modules_to_save, task)
    # Wrap the head first so its bias is the head's, not BitFit's (see the module docstring).
    wrap_modules_to_save(model, requested, required=bool(requested))
    selected = select_biases(model, method.biases)
    for name in selected:
        model.get_submodule(name).bias.requires_grad_(True)
    setattr(model, _SELECTED, selected)
    return model


def _selected(model: nn.Module) -> list[str]:
    if not hasattr(model, _SELECTED):
        raise AdapterError("the model was not prepared for BitFit: inject it before saving or loading biases")
    return getattr(model, _SELECTED)


def _bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """`base_model.model.<module>.bias` (the base model's own names) -> the bias, for each trained bias."""
    return {f"{KEY_PREFIX}{name}.bias": model.get_submodule(name).bias for name in _selected(model)}


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The trained biases plus the head."""
    state = {key: p.detach() for key, p in _bias_parameters(model).items()}
    state.update(modules_to_save_state(model))
    return state


def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    load_state_strict(model, _bias_parameters(model), state)


def adapter_config(model: nn.Module, method: MethodSection, task: str) -> dict:
    return {
        "biases": method.biases,
        # The resolved modules, so loading trains exactly these whatever `all` means on another version.
        "target_modules": list(_selected(model)),
        "modules_to_save": default_modules_to_save(method.modules_to_save, task),
    }


def method_from_config(config: dict) -> MethodSection:
    """The MethodSection that rebuilds a saved BitFit adapter; fields we do not know are ignored."""
    targets = config.get("target_modules")
    if targets is not None:
        if not _is_str_list(targets) or not targets:
            raise UserError(
                "adapter_config.json: target_modules: expected a non-empty list of "
                f"module names, got {targets!r}"
            )
        biases = targets  # full module names: an exact match each
    else:
        biases = config.get("biases", "all")
        if biases != "all" and not (_is_str_list(biases) and biases):
            raise UserError(
                "adapter_config.json: biases: expected `all` or a non-empty list "
                f"of module names, got {biases!r}"
            )
    saved = config.get("modules_to_save")
    if saved is not None and not _is_str_list(saved):
        raise UserError(
            f"adapter_config.json: modules_to_save: expected a list of module names or null, got {saved!r}"
        )
    return MethodSection(name="bitfit", biases=biases, modules_to_save=saved)


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def merge(model: nn.Module) -> nn.Module:
    """The plain model: the biases are already in place; each head wrapper gives way to its trained copy."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]:
        set_submodule(model, name, module.trained)
    if hasattr(model, _SELECTED):
        delattr(model, _SELECTED)
    return model
