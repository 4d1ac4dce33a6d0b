"""Bottleneck adapters: a small residual MLP on the output of a transformer sub-block.

Houlsby et al. 2019 (arXiv:1902.00751) put one adapter after the attention block's output projection and
one after the feed-forward block, in every layer; Pfeiffer et al. 2020 (arXiv:2005.00247) found one per
layer, after the feed-forward block, about as good at half the cost. Both are the same module:

    h' = h + up(act(down(h)))      down: hidden -> bottleneck, up: bottleneck -> hidden

placed on the sub-block's output *before* the model adds its own residual (and, in BERT, before the
LayerNorm), which is where Houlsby put it. Pfeiffer's adapter also sits after the feed-forward output;
we use the same module and position for both and differ only in which sub-blocks get one (the
AdapterFusion paper's extra LayerNorm rewiring is not reproduced). ``up`` starts at zero, so at init the
adapter adds nothing and the model's output is exactly the base model's. Layer norms stay frozen.

HF PEFT has no bottleneck adapters; the files use its layout with a ``peft_type`` of our own.
"""

from __future__ import annotations

from torch import Tensor, nn

from peftcli.errors import UserError, did_you_mean
from peftcli.layout import adapter_sites as sites_among
from peftcli.layout import bottleneck_size, default_modules_to_save, inside
from peftcli.methods.common import (
    KEY_PREFIX,
    AdapterError,
    ModulesToSave,
    freeze,
    layer_shape,
    load_state_strict,
    match_targets,
    modules_to_save_state,
    set_submodule,
    wrap_modules_to_save,
)
from peftcli.recipe import MethodSection, method_choices

PEFT_TYPE = "BOTTLENECK_ADAPTER"
MERGEABLE = False
WHY_NOT_MERGEABLE = (
    "a bottleneck adapter is non-linear (up(act(down(h)))), so it cannot be folded into the base weights; "
    "serve the base model with the adapter loaded instead"
)

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """out = base(x) + adapter_up(act(adapter_down(base(x)))) — Houlsby et al. 2019, arXiv:1902.00751.

    base: the frozen output projection (Linear or Conv1D), (..., in) -> (..., hidden).
    adapter_down: (..., hidden) -> (..., bottleneck); adapter_up: (..., bottleneck) -> (..., hidden).
    """

    def __init__(self, base: nn.Module, bottleneck: int, activation: str):
        super().__init__()
        self.base = base
        _, hidden = layer_shape(base)
        weight = base.weight
        # On the base's device and dtype: on the meta device these are shapes only, loaded later.
        self.adapter_down = nn.Linear(hidden, bottleneck, device=weight.device, dtype=weight.dtype)
        self.activation = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(bottleneck, hidden, device=weight.device, dtype=weight.dtype)
        # Zero `up` (weight and bias) makes the adapter the identity at init: training starts from the
        # base model's behaviour. `down` keeps nn.Linear's default init so `up` gets a useful gradient.
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    @property
    def bottleneck(self) -> int:
        return self.adapter_down.out_features

    def forward(self, x: Tensor) -> Tensor:
        h = self.base(x)  # (..., hidden)
        return h + self.adapter_up(self.activation(self.adapter_down(h)))


# --------------------------------------------------------------------------------------------------
# Finding where the adapters go


def _saved_prefixes(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, ModulesToSave)]


def adapter_sites(model: nn.Module, method: MethodSection) -> list[str]:
    """Full names of the modules to wrap, in model order.

    With method.target_modules unset, the architecture's sites for the placement (Houlsby: attention and
    feed-forward outputs; Pfeiffer: feed-forward outputs); otherwise the listed modules, matched like
    LoRA's targets (an exact name or `.`-suffix, or a regular expression). Modules trained in full
    (modules_to_save) never get an adapter.
    """
    skip = _saved_prefixes(model)
    if method.target_modules is not None:
        names = [n for n in match_targets(model, method.target_modules) if not inside(n, skip)]
        if not names:
            raise UserError(
                f"method.target_modules: {method.target_modules!r} matches only modules "
                "trained in full (modules_to_save); name the layers whose outputs should get an adapter"
            )
        return names
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = [n for n, _ in model.named_modules() if not inside(n, skip)]
    return sites_among(names, model_type, method.placement)


# --------------------------------------------------------------------------------------------------
# The method contract


def inject(model: nn.Module, method: MethodSection, task: str) -> nn.Module:
    """Freeze `model`, wrap each site in a BottleneckAdapter, train the head in full; returns `model`."""
    if method.activation not in ACTIVATIONS:
        choices = ", ".join(ACTIVATIONS)
        raise UserError(
            f"method.activation: expected one of {choices}, got {method.activation!r}"
            + did_you_mean(str(method.activation), ACTIVATIONS)
        )
    if method.placement not in method_choices("placement"):
        raise UserError(f"method.placement: expected houlsby or pfeiffer, got {method.placement!r}")
    freeze(model)
    requested = default_modules_to_save(method.modules_to_save, task)
    wrap_modules_to_save(model, requested, required=bool(requested))
    for name in adapter_sites(model, method):
        base = model.get_submodule(name)
        _, hidden = layer_shape(base)
        wrapper = BottleneckAdapter(base, bottleneck_size(method, hidden), method.activation)
        set_submodule(model, name, wrapper)
    return model


def _adapters(model: nn.Module) -> list[tuple[str, BottleneckAdapter]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """`base_model.model.<site>.adapter_{down,up}.{weight,bias}` -> the parameter, in model order."""
    return {
        f"{KEY_PREFIX}{name}.{part}.{pname}": p
        for name, module in _adapters(model)
        for part in ("adapter_down", "adapter_up")
        for pname, p in getattr(module, part).named_parameters()
    }


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights plus the modules_to_save weights."""
    state = {key: p.detach() for key, p in _adapter_parameters(model).items()}
    state.update(modules_to_save_state(model))
    return state


def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    params = _adapter_parameters(model)
    if not params:
        raise AdapterError("the model holds no bottleneck adapters: inject them before loading their weights")
    load_state_strict(model, params, state)


def adapter_config(model: nn.Module, method: MethodSection, task: str) -> dict:
    return {
        "placement": method.placement,
        "bottleneck_size": method.bottleneck_size,
        "reduction_factor": method.reduction_factor,
        "activation": method.activation,
        # The resolved sites, so loading wraps exactly these whatever the table says later.
        "target_modules": [name for name, _ in _adapters(model)],
        "modules_to_save": default_modules_to_save(method.modules_to_save, task),
    }


def method_from_config(config: dict) -> MethodSection:
    """The MethodSection that rebuilds a saved adapter; fields we do not know are ignored."""

    def fail(field: str, message: str) -> UserError:
        return UserError(f"adapter_config.json: {field}: {message}")

    placement = config.get("placement", "pfeiffer")
    if placement not in method_choices("placement"):
        raise fail(
            "placement", f"expected one of {', '.join(method_choices('placement'))}, got {placement!r}"
        )
    activation = config.get("activation", "relu")
    if activation not in ACTIVATIONS:
        raise fail("activation", f"expected one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    size = config.get("bottleneck_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise fail("bottleneck_size", f"expected a positive integer or null, got {size!r}")
    factor = config.get("reduction_factor", 16)
    if not isinstance(factor, int) or isinstance(factor, bool) or factor <= 0:
        raise fail("reduction_factor", f"expected a positive integer, got {factor!r}")
    targets = config.get("target_modules")
    if targets is not None and not (isinstance(targets, str) or _is_str_list(targets) and targets):
        raise fail("target_modules", f"expected a non-empty list of module names, got {targets!r}")
    saved = config.get("modules_to_save")
    if saved is not None and not _is_str_list(saved):
        raise fail("modules_to_save", f"expected a list of module names or null, got {saved!r}")
    return MethodSection(
        name="adapter",
        placement=placement,
        bottleneck_size=size,
        reduction_factor=factor,
        activation=activation,
        target_modules=targets,
        modules_to_save=saved,
    )


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def merge(model: nn.Module) -> nn.Module:
    raise UserError(f"method adapter cannot be merged: {WHY_NOT_MERGEABLE}")
