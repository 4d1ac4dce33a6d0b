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

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from peftcli.errors import UserError, did_you_mean
from peftcli.lazy import LazyModule, nn
from peftcli.methods import layout
from peftcli.methods.base import (
    TARGETS_ACCEPTS,
    Context,
    Fail,
    MethodConfig,
    adapter_field_error,
    check_positive,
    check_targets,
    choices,
    is_str_list,
    modules_to_save_field,
    saved_modules,
)
from peftcli.models.shapes import NotModelled

if TYPE_CHECKING:
    from torch import Tensor

    from peftcli.methods.modules import AdaptedLayer
    from peftcli.models.shapes import Shapes

modules = LazyModule("peftcli.methods.modules")

NAME = "adapter"
PEFT_TYPE = "BOTTLENECK_ADAPTER"
MERGEABLE = False
WHY_NOT_MERGEABLE = (
    "a bottleneck adapter is non-linear (up(act(down(h)))), so it cannot be folded into the base weights; "
    "serve the base model with the adapter loaded instead"
)
# The learning rate a recipe gets when it sets none: 1e-4, as AdapterHub's training examples and Pfeiffer et
# al. 2021 (arXiv:2005.00247) use (Houlsby et al. swept 3e-5 to 3e-3).
LEARNING_RATE = 1e-4


@dataclass
class Config(MethodConfig):
    name: ClassVar[str] = NAME
    ACCEPTS: ClassVar[dict[str, str]] = {**MethodConfig.ACCEPTS, "target_modules": TARGETS_ACCEPTS}
    HEADS_REQUIRED: ClassVar[bool] = True

    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    bottleneck_size: int | None = None  # default: hidden_size // reduction_factor
    reduction_factor: int = 16
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    # None: the placement's sites; else the output projections to adapt, matched like LoRA's targets.
    target_modules: list[str] | str | None = None

    def check(self, fail: Fail) -> None:
        check_positive(self, "reduction_factor bottleneck_size", fail)
        check_targets(self.target_modules, fail)


ACTIVATIONS = choices(Config, "activation")


def bottleneck_size(config: Config, hidden: int) -> int:
    """config.bottleneck_size, else hidden // reduction_factor, never below 1."""
    if config.bottleneck_size is not None:
        return config.bottleneck_size
    return max(1, hidden // config.reduction_factor)


# --------------------------------------------------------------------------------------------------
# The layer


def run(layer: AdaptedLayer, x: Tensor) -> Tensor:
    """out = h + adapter_up(act(adapter_down(h))), h = base(x) — Houlsby et al. 2019, arXiv:1902.00751.

    base: the frozen output projection (Linear or Conv1D), (..., in) -> (..., hidden);
    adapter_down: (..., hidden) -> (..., bottleneck); adapter_up: (..., bottleneck) -> (..., hidden).
    """
    h = layer.base(x)
    return h + layer.adapter_up(layer.activation(layer.adapter_down(h)))


def wrap_layer(base, bottleneck: int, activation: str) -> AdaptedLayer:
    layer = modules.AdaptedLayer(base, NAME, run, "BottleneckAdapter", bottleneck=bottleneck)
    factory = modules.parameter_factory(base)  # on the meta device: shapes only, loaded later
    layer.adapter_down = nn.Linear(layer.out_features, bottleneck, **factory)
    layer.activation = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}[activation]()
    layer.adapter_up = nn.Linear(bottleneck, layer.out_features, **factory)
    # Zero `up` (weight and bias) makes the adapter the identity at init: training starts from the
    # base model's behaviour. `down` keeps nn.Linear's default init so `up` gets a useful gradient.
    nn.init.zeros_(layer.adapter_up.weight)
    nn.init.zeros_(layer.adapter_up.bias)
    return layer


def adapter_layers(model) -> list[tuple[str, AdaptedLayer]]:
    return modules.adapted_layers(model, NAME)


# --------------------------------------------------------------------------------------------------
# Finding where the adapters go


def adapter_sites(model, config: Config) -> list[str]:
    """Full names of the modules to wrap, in model order.

    With target_modules unset, the architecture's sites for the placement (Houlsby: attention and
    feed-forward outputs; Pfeiffer: feed-forward outputs); otherwise the listed modules, matched like
    LoRA's targets (an exact name or `.`-suffix, or a regular expression). Modules trained in full
    (modules_to_save) never get an adapter.
    """
    skip = modules.saved_module_names(model)
    if config.target_modules is not None:
        names = [n for n in modules.match_targets(model, config.target_modules) if not layout.inside(n, skip)]
        if not names:
            raise UserError(
                f"method.target_modules: {config.target_modules!r} matches only modules "
                "trained in full (modules_to_save); name the layers whose outputs should get an adapter"
            )
        return names
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = [n for n, _ in model.named_modules() if not layout.inside(n, skip)]
    return layout.adapter_sites(names, model_type, config.placement)


# --------------------------------------------------------------------------------------------------
# The method contract


def inject(model, config: Config, context: Context):
    """Freeze `model`, wrap each site in a bottleneck adapter, train the head in full; returns `model`."""
    if config.activation not in ACTIVATIONS:
        raise UserError(
            f"method.activation: expected one of {', '.join(ACTIVATIONS)}, got {config.activation!r}"
            + did_you_mean(str(config.activation), ACTIVATIONS)
        )
    if config.placement not in choices(Config, "placement"):
        raise UserError(f"method.placement: expected houlsby or pfeiffer, got {config.placement!r}")
    modules.freeze(model)
    modules.wrap_modules_to_save(model, *saved_modules(config, context.task))
    for name in adapter_sites(model, config):
        base = model.get_submodule(name)
        _, hidden = modules.layer_shape(base)
        modules.set_submodule(
            model, name, wrap_layer(base, bottleneck_size(config, hidden), config.activation)
        )
    return model


def adapter_state(model) -> dict[str, Tensor]:
    """The adapters' weights plus the modules_to_save weights."""
    return modules.layer_state(model, NAME)


def load_adapter_state(model, state: dict[str, Tensor]) -> None:
    modules.load_layer_state(model, NAME, state)


def merge(model):
    raise UserError(f"method adapter cannot be merged: {WHY_NOT_MERGEABLE}")


# --------------------------------------------------------------------------------------------------
# Counting from shapes


def count(shapes: Shapes, config: Config, saved: list[str]) -> tuple[int, int]:
    """(trainable, added) parameters of the adapters inject() would add to the model `shapes` describes."""
    if config.activation not in ACTIVATIONS or config.placement not in choices(Config, "placement"):
        raise NotModelled("inject() refuses this")
    if config.target_modules is None:
        free = [n for n in shapes.module_names() if not layout.inside(n, saved)]
        sites = layout.adapter_sites(free, shapes.model_type, config.placement)
    else:  # matched as inject() does: after the saved modules are wrapped, so inside them under new names
        linears = [wrapped for n in shapes.linears for wrapped in _wrapped_names(n, saved)]
        skip = {shapes.output_head} if config.target_modules == "all-linear" and shapes.output_head else set()
        sites = layout.select_targets(linears, config.target_modules, skip)
        sites = [n for n in sites if not layout.inside(n, saved)]
    if not sites or any(n not in shapes.linears for n in sites):
        raise NotModelled("adapter sites")
    added = 0
    for name in sites:
        hidden = shapes.linears[name].out_features
        size = bottleneck_size(config, hidden)
        added += (hidden + 1) * size + (size + 1) * hidden  # down: hidden -> size, up: size -> hidden
    return added, added


def _wrapped_names(name: str, saved: list[str]) -> list[str]:
    """`name` as named_modules() shows it once the saved module holding it is wrapped (ModulesToSave)."""
    for module in saved:
        if layout.inside(name, [module]):
            rest = name.removeprefix(module)
            return [f"{module}.original_module{rest}", f"{module}.trained{rest}"]
    return [name]


# --------------------------------------------------------------------------------------------------
# adapter_config.json, both ways


def adapter_config(model, config: Config, task: str) -> dict:
    return {
        "placement": config.placement,
        "bottleneck_size": config.bottleneck_size,
        "reduction_factor": config.reduction_factor,
        "activation": config.activation,
        # The resolved sites, so loading wraps exactly these whatever the table says later.
        "target_modules": [name for name, _ in adapter_layers(model)],
        "modules_to_save": saved_modules(config, task)[0],
    }


def config_from_adapter(fields: dict) -> Config:
    """The Config that rebuilds a saved adapter; fields we do not know are ignored."""
    placement = fields.get("placement", "pfeiffer")
    if placement not in choices(Config, "placement"):
        raise adapter_field_error(
            "placement", f"expected one of {', '.join(choices(Config, 'placement'))}, got {placement!r}"
        )
    activation = fields.get("activation", "relu")
    if activation not in ACTIVATIONS:
        raise adapter_field_error(
            "activation", f"expected one of {', '.join(ACTIVATIONS)}, got {activation!r}"
        )
    size = fields.get("bottleneck_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise adapter_field_error("bottleneck_size", f"expected a positive integer or null, got {size!r}")
    factor = fields.get("reduction_factor", 16)
    if not isinstance(factor, int) or isinstance(factor, bool) or factor <= 0:
        raise adapter_field_error("reduction_factor", f"expected a positive integer, got {factor!r}")
    targets = fields.get("target_modules")
    if targets is not None and not (isinstance(targets, str) or is_str_list(targets) and targets):
        raise adapter_field_error(
            "target_modules", f"expected a non-empty list of module names, got {targets!r}"
        )
    return Config(
        placement=placement,
        bottleneck_size=size,
        reduction_factor=factor,
        activation=activation,
        target_modules=targets,
        modules_to_save=modules_to_save_field(fields),
    )
