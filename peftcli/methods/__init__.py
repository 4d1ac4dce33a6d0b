"""The PEFT methods, one module each, and the one registry that names them.

A method module owns everything about its method, so adding one is a new module plus one line in METHODS:

- ``NAME`` (the recipe's ``method.name``), ``PEFT_TYPE`` (adapter_config.json's ``peft_type``: HF PEFT's
  name where it has one), ``MERGEABLE`` (and ``WHY_NOT_MERGEABLE`` where it is not).
- ``LEARNING_RATE`` (optional): the learning rate a recipe that sets none trains it with, from the method's
  paper or HF PEFT's guide (prompt and prefix tuning need rates ~100x LoRA's); DEFAULT_LEARNING_RATE without.
- ``Config``: its recipe section, a dataclass subclassing ``base.MethodConfig`` (fields, defaults,
  ``check``).
- ``count(shapes, config, saved) -> (trainable, added)``: its parameters from the model's shapes alone
  (``peft count`` without torch); may raise ``models.shapes.NotModelled``.
- ``inject(model, config, context) -> nn.Module``: freeze the base model, add the method's trainable parts
  (and ``modules_to_save``), return the model to train: ``model`` itself, or a wrapper whose ``forward`` and
  ``generate`` take the base model's arguments and which keeps it as ``.base_model``. New parameters are
  created on the base weights' device and dtype, so it also works on the meta device.
- ``adapter_state(model)`` / ``load_adapter_state(model, state)``: the trainable state under HF PEFT's keys
  (missing or unexpected keys raise ``AdapterError``).
- ``adapter_config(model, config, task) -> dict`` / ``config_from_adapter(fields) -> Config``: its fields
  of adapter_config.json, both ways; a field that changes the math and is not supported raises UserError.
- ``merge(model)``; a method of adapted layers that merges also has ``fold(layer, weight) -> weight``,
  which `peft merge` applies tensor by tensor, and ``fold_bias(layer, bias) -> bias`` where merging changes
  the bias too (IA3).
- ``disabled(model)`` (only where the generic one does not fit): a context manager within which the model
  computes exactly as the base model, its trained parts kept aside and back in place on exit. The preference
  objectives take the reference policy from it, without a second copy of the model. Methods whose trained
  parts all live in ``modules.AdaptedLayer``, ``modules.ModulesToSave`` or a ``virtual.VirtualTokenModel``
  need none: ``modules.disabled`` switches those off (each falls back to the module it wraps). BitFit, which
  trains the base model's own biases in place, has its own (`disabled` below picks it).

Optional, for the training loop:

- ``learning_rate_scales(model, config) -> dict[str, float]``: a trainable parameter's learning rate as a
  multiple of the schedule's, by parameter name (absent: 1); the optimizer gets one parameter group per
  scale (LoRA+ trains B faster than A).
- ``initial_state(model) -> dict[str, Tensor]``: what inject needs to rebuild the same starting point when
  it is not a function of the seed alone (PiSSA's factors, which also set the residual base weights).
  Training checkpoints store it, and ``--resume`` hands it back to inject as ``Context.initial``.

Method modules import no torch until a model is touched (peftcli/lazy.py): `peft count` reads their
configs and counts in half a second.

The methods that wrap linear layers (LoRA, IA3, VeRA, LoHa, LoKr, OFT) share `modules.AdaptedLayer` (their
forward is their own ``run(layer, x)``), ``targeting.inject_layers`` (which layers, modules_to_save),
``base.count_layers`` and the adapter_config field readers in base.py; tensors all of a method's layers read
(VeRA's projections) are one ``modules.SharedTensors``, saved once under model-level keys.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from types import ModuleType

from peftcli.errors import UserError, did_you_mean
from peftcli.lazy import LazyModule
from peftcli.methods import adapter, bitfit, ia3, loha, lokr, lora, oft, prefix, prompt, vera
from peftcli.methods.base import Context, MethodConfig

__all__ = [
    "DEFAULT_LEARNING_RATE",
    "METHODS",
    "TASK_TYPES",
    "Context",
    "MethodConfig",
    "by_peft_type",
    "config_class",
    "disabled",
    "default_learning_rate",
    "make_config",
]

modules = LazyModule("peftcli.methods.modules")

METHODS: dict[str, ModuleType] = {
    m.NAME: m for m in (lora, prefix, prompt, adapter, bitfit, ia3, vera, loha, lokr, oft)
}

# The learning rate of a method module without LEARNING_RATE: LoRA's, the most common.
DEFAULT_LEARNING_RATE = 2e-4

TASK_TYPES = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS"}  # ours -> HF PEFT's task_type


def by_peft_type(peft_type) -> ModuleType | None:
    """The method module that writes this adapter_config.json peft_type, or None."""
    return next((m for m in METHODS.values() if m.PEFT_TYPE == peft_type), None)


def config_class(name: str) -> type[MethodConfig]:
    if name not in METHODS:
        raise UserError(
            f"method.name: unknown method {name!r}{did_you_mean(name, METHODS)}; "
            f"choose from {', '.join(METHODS)}"
        )
    return METHODS[name].Config


def make_config(name: str, **fields) -> MethodConfig:
    """A method's Config by name: make_config("lora", rank=4)."""
    return config_class(name)(**fields)


def disabled(model, name: str) -> AbstractContextManager:
    """A context within which `model`, carrying method `name`, computes as its base model: the method's own
    ``disabled`` where it has one, else the generic switch of adapted layers and wrappers."""
    own = getattr(METHODS[name], "disabled", None)
    return own(model) if own is not None else modules.disabled(model)


def default_learning_rate(name: str) -> float:
    """The learning rate `name` trains with when the recipe sets none (train.learning_rate: null)."""
    return getattr(METHODS[name], "LEARNING_RATE", DEFAULT_LEARNING_RATE)
