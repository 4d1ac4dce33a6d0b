"""The torch side every method shares: the adapted-layer wrapper, freezing, finding and swapping modules,
``modules_to_save``, tensors all of a method's layers share, and the adapter state's keys.

Adapter state dict keys follow HF PEFT's on-disk layout: ``base_model.model.<module path>.<param>``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from peftcli.errors import UserError, did_you_mean
from peftcli.lazy import is_conv1d
from peftcli.methods.layout import matches, outermost, select_targets
from peftcli.quant.convert import is_quantized, quantized_numel

KEY_PREFIX = "base_model.model."


class AdapterError(UserError):
    """An adapter that does not fit the model (missing/unexpected keys, wrong shapes)."""


class Switchable(nn.Module):
    """A module whose trained part can be switched off: while ``adapter_enabled`` is False it computes as the
    base model's module it wraps. `disabled` flips every one in a model; the reference policy of the
    preference objectives is the model computed that way (no second copy of the base)."""

    adapter_enabled = True  # the class default; `disabled` sets it per instance and removes it afterwards


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every adapted layer, modules_to_save copy and virtual-token wrapper in `model`
    computes as the base model (their parts stay in place, untouched); restored on exit, errors included."""
    switches = [m for m in model.modules() if isinstance(m, Switchable) and m.adapter_enabled]
    for module in switches:
        module.adapter_enabled = False
    try:
        yield model
    finally:
        for module in switches:
            del module.adapter_enabled


class AdaptedLayer(Switchable):
    """A frozen layer (``base``) with a method's trainable parts beside it; ``forward`` is the method's.

    The method module builds the parts (named as in its adapter files: ``lora_A``, ``adapter_down`` ...) and
    supplies ``run(layer, x)``, its forward written as the formula. One class for every method keeps each
    method's own module free of torch at import time (see peftcli/lazy.py): its math lives there as a plain
    function. ``method`` names the method; ``settings`` (rank, scale ...) are plain attributes.

    ``casts_input``: the forward casts its input to the parts' dtype and its output back, so the parts may
    stay float32 master copies on a half-precision base.
    """

    def __init__(
        self,
        base: nn.Module,
        method: str,
        run: Callable[[AdaptedLayer, Tensor], Tensor],
        label: str,
        casts_input: bool = False,
        **settings,
    ):
        super().__init__()
        self.base = base
        self.method, self.run, self.label, self.casts_input = method, run, label, casts_input
        self.in_features, self.out_features = layer_shape(base)
        self.fan_in_fan_out = is_conv1d(base)  # Conv1D stores its weight transposed: (in, out)
        for name, value in settings.items():
            setattr(self, name, value)

    def forward(self, x: Tensor) -> Tensor:
        return self.run(self, x) if self.adapter_enabled else self.base(x)

    # Model code sometimes reads a projection's weight (e.g. its dtype); answer for the wrapped layer.
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def parts(self) -> dict[str, nn.Parameter]:
        """The method's own parameters (``lora_A.weight`` ...), not the base layer's."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base.")}

    def _get_name(self) -> str:  # what repr(model) shows: LoRALinear(...), BottleneckAdapter(...)
        return self.label

    def extra_repr(self) -> str:
        keys = ("rank", "alpha", "scale", "bottleneck", "is_feedforward", "num_blocks", "block_size")
        shown = {k: v for k, v in vars(self).items() if k in keys}
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def adapted_layers(model: nn.Module, method: str | None = None) -> list[tuple[str, AdaptedLayer]]:
    """(name, layer) of every adapted layer, or of one method's, in model order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, AdaptedLayer) and (method is None or m.method == method)
    ]


def model_type(model: nn.Module) -> str | None:
    """The transformers config's model_type (``llama``), which picks an architecture's default targets."""
    return getattr(getattr(model, "config", None), "model_type", None)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output embedding (lm_head) so all-linear can leave it out."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, m in model.named_modules() if out is not None and m is out}


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, GPT-2's Conv1D, or a frozen linear layer stored quantized (peftcli/quant)."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized(module)


def match_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the linear layers `targets` picks, in model order (`layout.select_targets`)."""
    names = [n for n, m in model.named_modules() if n and is_linear(m)]
    skip = output_head_names(model) if targets == "all-linear" else set()
    return select_targets(names, targets, skip)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a Conv1D (whose weight is stored transposed)."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features


def parameter_factory(base: nn.Module) -> dict:
    """New parts on the base weight's device and dtype (a quantized base: the dtype it computes in); on the
    meta device they are shapes only."""
    if is_quantized(base):
        return {"device": base.device, "dtype": base.compute_dtype}
    return {"device": base.weight.device, "dtype": base.weight.dtype}


def tied_parameters(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


# --------------------------------------------------------------------------------------------------
# modules_to_save: a trainable copy of a whole module (e.g. the classification head)


class ModulesToSave(Switchable):
    """Holds the frozen original and a trainable copy; forward uses the copy (the original while disabled).

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
        return (self.trained if self.adapter_enabled else self.original_module)(*args, **kwargs)


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


def saved_module_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, ModulesToSave)]


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


def unwrap_modules_to_save(model: nn.Module) -> None:
    """Each ModulesToSave gives way to its trained copy: the plain model, as merged."""
    for name in saved_module_names(model):
        set_submodule(model, name, model.get_submodule(name).trained)


# --------------------------------------------------------------------------------------------------
# The adapter state


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


def layer_parameters(model: nn.Module, method: str) -> dict[str, nn.Parameter]:
    """Every part of one method's adapted layers under its adapter-file key, in model order."""
    return {
        f"{KEY_PREFIX}{name}.{part}": p
        for name, layer in adapted_layers(model, method)
        for part, p in layer.parts().items()
    }


def layer_state(model: nn.Module, method: str) -> dict[str, Tensor]:
    """The adapter file's tensors for a method of adapted layers: their parts, the shared tensors they save
    (VeRA's projections) and modules_to_save."""
    state = {key: p.detach() for key, p in layer_parameters(model, method).items()}
    state.update({key: t.detach() for key, t in shared_tensors(model, method, saved_only=True).items()})
    state.update(modules_to_save_state(model))
    return state


def load_layer_state(model: nn.Module, method: str, state: dict[str, Tensor]) -> None:
    params = layer_parameters(model, method)
    if not params:
        raise AdapterError(f"the model holds no {method} layers: inject them before loading their weights")
    load_state_strict(model, {**params, **shared_tensors(model, method, saved_only=True)}, state)


def merge_layers(
    model: nn.Module,
    method: str,
    fold: Callable[[AdaptedLayer, Tensor], Tensor],
    title: str,
    fold_bias: Callable[[AdaptedLayer, Tensor], Tensor] | None = None,
) -> nn.Module:
    """Replace each adapted layer by its base with ``weight = fold(layer, weight)`` (and, for a method that
    changes the bias too, ``bias = fold_bias(layer, bias)``); unwrap the saved modules. `title`: the method
    as messages name it (LoRA).

    Every check before the first change: a tied weight (which the fold would change under another name too)
    or a quantized one leaves the model as it was.
    """
    tied = tied_parameters(model)
    layers = adapted_layers(model, method)
    for name, layer in layers:
        if is_quantized(layer.base):  # folding would requantize: not the model that was trained
            raise UserError(
                f"cannot merge {title} into `{name}`: its weight is stored quantized (model.quantize); "
                "dequantize the model first (peft merge does)"
            )
        if id(layer.base.weight) in tied:
            raise UserError(
                f"cannot merge {title} into `{name}`: its weight is shared with another layer "
                "(tied embeddings), which the merge would change too"
            )
    for name, layer in layers:
        weight, bias = layer.base.weight, layer.base.bias
        with torch.no_grad():
            weight.copy_(fold(layer, weight))
            if fold_bias is not None and bias is not None:
                bias.copy_(fold_bias(layer, bias))
        set_submodule(model, name, layer.base)
    unwrap_modules_to_save(model)
    return model


# --------------------------------------------------------------------------------------------------
# Tensors all layers of one method share (VeRA's frozen random projections)


class SharedTensors(nn.Module):
    """Frozen tensors every adapted layer of one method reads: one module object that each layer holds as
    ``.shared``, so the model holds the tensors once and ``model.to(...)`` moves them once.

    Buffers, not parameters: they never train, and HF PEFT counts no buffer among a model's parameters.
    They stay out of the model's own state dict (``persistent=False``); the adapter file holds them once,
    under model-level keys (``base_model.vera_A``), when ``saved``; otherwise the method rebuilds them.
    """

    def __init__(self, tensors: dict[str, Tensor], saved: bool):
        super().__init__()
        self.saved = saved
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)

    def state(self) -> dict[str, Tensor]:
        """The tensors under their adapter-file keys: ``base_model.<name>``."""
        return {f"{SHARED_PREFIX}{name}": t for name, t in self.named_buffers(recurse=False)}


SHARED_PREFIX = "base_model."


def shared_tensors(
    model: nn.Module, method: str | None = None, saved_only: bool = False
) -> dict[str, Tensor]:
    """The shared tensors of one method's layers (or every method's), each once, under its adapter-file key;
    `saved_only`: those the adapter file holds."""
    found: dict[str, Tensor] = {}
    for _, layer in adapted_layers(model, method):
        shared = getattr(layer, "shared", None)
        if isinstance(shared, SharedTensors) and (shared.saved or not saved_only):
            found.update(shared.state())
    return found


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), each shared tensor once: HF PEFT's convention. A quantized weight counts as the
    weights it stands for (as HF PEFT counts bitsandbytes' 4-bit ones)."""
    trainable, total = 0, quantized_numel(model)
    for p in model.parameters():  # parameters() already yields a shared tensor once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
