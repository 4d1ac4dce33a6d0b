"""Choosing the linear layers a method wraps, for the methods of adapted layers (IA3, VeRA, LoHa, LoKr, OFT),
and naming them in adapter_config.json so that HF PEFT wraps the same ones. Torch-side: method modules reach
it through a lazy import (peftcli/lazy.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from peftcli.errors import UserError
from peftcli.methods.base import Context, MethodConfig, saved_modules
from peftcli.methods.layout import covers, matches
from peftcli.methods.modules import (
    AdaptedLayer,
    adapted_layers,
    freeze,
    match_targets,
    set_submodule,
    wrap_modules_to_save,
)

log = logging.getLogger(__name__)


def claim_targets(
    model: nn.Module, method: str, title: str, targets: list[str] | str, config: MethodConfig, task: str
) -> list[str]:
    """The first half of such a method's inject: refuse a model that already holds its layers, freeze it,
    and return the full names of the layers to wrap, in model order (`target_layers`). The method then wraps
    them and the modules trained in full (``modules.wrap_modules_to_save``). `title`: the method as messages
    name it (VeRA)."""
    if adapted_layers(model, method):
        raise UserError(f"the model already holds {title} layers: merge or reload the base model first")
    freeze(model)
    return target_layers(model, targets, saved_modules(config, task)[0], title)


def inject_layers(
    model: nn.Module,
    config: MethodConfig,
    context: Context,
    method: str,
    title: str,
    targets: list[str] | str,
    wrap: Callable[[str, nn.Module], AdaptedLayer],
) -> nn.Module:
    """Such a method's inject: freeze `model`, replace each target layer by ``wrap(name, layer)``, train the
    modules_to_save in full; returns `model` (changed in place)."""
    for name in claim_targets(model, method, title, targets, config, context.task):
        set_submodule(model, name, wrap(name, model.get_submodule(name)))
    wrap_modules_to_save(model, *saved_modules(config, context.task))
    return model


def target_layers(model: nn.Module, targets: list[str] | str, save_names: list[str], title: str) -> list[str]:
    """Full names of the linear layers `targets` picks, in model order, less those inside a module trained in
    full (`save_names`, modules_to_save entries): it trains anyway."""
    names = match_targets(model, targets)
    inside = [name for name in names if any(covers(s, name) for s in save_names)]
    if inside:
        if len(inside) == len(names):
            raise UserError(
                f"method.target_modules: every matched layer (e.g. `{inside[0]}`) lies in "
                f"modules_to_save {save_names}, which trains in full: nothing left for {title}"
            )
        log.warning("%s leaves out %s: modules_to_save trains it in full", title, ", ".join(inside))
    return [name for name in names if name not in inside]


def config_target_names(model: nn.Module, wrapped: list[str]) -> list[str]:
    """adapter_config.json's target_modules for the `wrapped` layers: the leaf names (``q_proj``) when they
    pick out exactly those layers, else the full names.

    HF PEFT matches a list entry as the full name or a ``.``-suffix, against every module; a regex or a
    path-qualified target may have chosen a subset that the bare leaf names would overshoot.
    """
    leaves = sorted({name.rsplit(".", 1)[-1] for name in wrapped})
    picked = {
        name for name, _ in model.named_modules() if name and any(matches(name, leaf) for leaf in leaves)
    }
    return leaves if picked == set(wrapped) else list(wrapped)
