"""LoRA: a frozen linear layer plus a trainable low-rank update — Hu et al. 2021, arXiv:2106.09685.

    y = W x + b + scale * B (A (dropout(x))),    A: (r, in),  B: (out, r),  scale = alpha / r

rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) uses scale = alpha / sqrt(r). B starts at zero, so the
wrapped model equals the base model at init. State keys follow HF PEFT's files:
``base_model.model.<module path>.lora_A.weight`` and ``...lora_B.weight``. Merging folds
``W += scale * B @ A`` into each base layer.

Everything about the method is here: its recipe section (``Config``), its count from shapes (what
``peft count`` answers without torch), its adapter_config.json fields both ways, and the layer. This module
imports no torch until a layer is built (peftcli/lazy.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from peftcli.errors import UserError
from peftcli.lazy import LazyModule, nn, torch
from peftcli.methods import layout
from peftcli.methods.base import (
    TARGETS_ACCEPTS,
    Context,
    Fail,
    MethodConfig,
    check_positive,
    check_targets,
    saved_modules,
)
from peftcli.models.shapes import NotModelled

if TYPE_CHECKING:
    from torch import Tensor

    from peftcli.methods.modules import AdaptedLayer
    from peftcli.models.shapes import Shapes

modules = LazyModule("peftcli.methods.modules")
log = logging.getLogger(__name__)

NAME = "lora"
PEFT_TYPE = "LORA"
MERGEABLE = True
# The learning rate a recipe gets when it sets none: QLoRA's (Dettmers et al. 2023, arXiv:2305.14314) for
# models up to 13B, the usual LoRA default.
LEARNING_RATE = 2e-4


@dataclass
class Config(MethodConfig):
    name: ClassVar[str] = NAME
    ACCEPTS: ClassVar[dict[str, str]] = {**MethodConfig.ACCEPTS, "target_modules": TARGETS_ACCEPTS}

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # None: the architecture's usual targets; "all-linear"; a list of names / `.`-suffixes; any other
    # string is a regular expression matched against the full module name.
    target_modules: list[str] | str | None = None
    use_rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank (Kalajdzievski 2023)
    init: Literal["kaiming", "gaussian"] = "kaiming"  # A's init; B starts at zero either way

    def check(self, fail: Fail) -> None:
        check_positive(self, "rank alpha", fail)
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"must be in [0, 1), got {self.dropout}")
        check_targets(self.target_modules, fail)


# --------------------------------------------------------------------------------------------------
# The layer


def run(layer: AdaptedLayer, x: Tensor) -> Tensor:
    """y = base(x) + scale * B(A(dropout(x))); x: (..., in) -> (..., out).

    A frozen half-precision base may hold float32 factors: the low-rank path then runs in float32 and is
    added in the base's dtype (autocast, when on, casts by itself).
    """
    out = layer.base(x)
    h = x if layer.dropout is None else layer.dropout(x)
    if h.dtype != layer.lora_A.weight.dtype and not torch.is_autocast_enabled(h.device.type):
        h = h.to(layer.lora_A.weight.dtype)
    # (..., in) @ (in, r) @ (r, out): the rank-r path stays cheap; never x @ (A @ B).
    return out + (layer.scale * layer.lora_B(layer.lora_A(h))).to(out.dtype)


def wrap_layer(
    base, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming"
) -> AdaptedLayer:
    """A frozen ``nn.Linear`` or GPT-2 ``Conv1D`` with LoRA factors beside it.

    A Conv1D stores its weight transposed, (in, out); the factors are plain Linears either way, so only the
    merge needs to know (``fan_in_fan_out``).
    """
    scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    layer = modules.AdaptedLayer(
        base, NAME, run, "LoRALinear", casts_input=True, rank=rank, alpha=alpha, scale=scale
    )
    # None rather than nn.Dropout(0): at p = 0 the forward skips the call and its full-size copy.
    layer.dropout = nn.Dropout(dropout) if dropout > 0 else None
    factory = modules.parameter_factory(base)  # on the meta device: shapes only
    layer.lora_A = nn.Linear(layer.in_features, rank, bias=False, **factory)
    layer.lora_B = nn.Linear(rank, layer.out_features, bias=False, **factory)
    reset_parameters(layer, init)
    return layer


def reset_parameters(layer: AdaptedLayer, init: str) -> None:
    """HF PEFT's choices: A ~ kaiming-uniform(a=sqrt(5)) or N(0, (1/r)^2); B = 0 (a no-op at init)."""
    if init == "gaussian":
        nn.init.normal_(layer.lora_A.weight, std=1 / layer.rank)
    else:
        nn.init.kaiming_uniform_(layer.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B.weight)


def delta_weight(lora_A: Tensor, lora_B: Tensor, scale: float, fan_in_fan_out: bool) -> Tensor:
    """scale * B @ A, laid out like the base weight: (out, in), or (in, out) for a Conv1D.

    lora_A: (r, in), lora_B: (out, r). Computed and returned in at least float32, so a caller adds it
    to the weight in float32 and rounds once: ``(W.float() + delta).to(W.dtype)``.
    """
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    delta = (lora_B.to(dtype) @ lora_A.to(dtype)) * scale
    return delta.T if fan_in_fan_out else delta


def fold(layer: AdaptedLayer, weight: Tensor) -> Tensor:
    """The base weight with the update folded in: W + scale * B @ A, added in float32, rounded once."""
    delta = delta_weight(layer.lora_A.weight, layer.lora_B.weight, layer.scale, layer.fan_in_fan_out)
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


def lora_layers(model) -> list[tuple[str, AdaptedLayer]]:
    return modules.adapted_layers(model, NAME)


# --------------------------------------------------------------------------------------------------
# The method contract


def resolve_targets(model, config: Config) -> list[str]:
    """Full names of the layers to wrap: the recipe's targets, else the architecture's usual ones."""
    targets = config.target_modules
    if targets is None:
        targets = layout.default_targets(getattr(getattr(model, "config", None), "model_type", None))
    return modules.match_targets(model, targets)


def inject(model, config: Config, context: Context):
    """Freeze `model` and wrap each target layer in a LoRA layer, in place; returns `model`."""
    if lora_layers(model):
        raise UserError("the model already holds LoRA layers: merge or reload the base model first")
    modules.freeze(model)
    names = resolve_targets(model, config)
    save_names, required = saved_modules(config, context.task)
    # A layer inside a module trained in full (the classifier head) gets no LoRA: it trains anyway.
    inside = [name for name in names if any(layout.covers(s, name) for s in save_names)]
    if inside:
        if len(inside) == len(names):
            raise UserError(
                f"method.target_modules: every matched layer (e.g. `{inside[0]}`) lies in "
                f"modules_to_save {save_names}, which trains in full: nothing left for LoRA"
            )
        log.warning("LoRA leaves out %s: modules_to_save trains it in full", ", ".join(inside))
        names = [name for name in names if name not in inside]
    for name in names:
        layer = model.get_submodule(name)
        in_features, out_features = modules.layer_shape(layer)
        if config.rank > min(in_features, out_features):
            raise UserError(
                f"method.rank: {config.rank} is larger than layer `{name}` allows "
                f"(in {in_features}, out {out_features}): use a rank <= {min(in_features, out_features)}"
            )
        wrapper = wrap_layer(layer, config.rank, config.alpha, config.dropout, config.use_rslora, config.init)
        modules.set_submodule(model, name, wrapper)
    modules.wrap_modules_to_save(model, save_names, required=required)
    return model


def adapter_state(model) -> dict[str, Tensor]:
    return modules.layer_state(model, NAME)


def load_adapter_state(model, state: dict[str, Tensor]) -> None:
    modules.load_layer_state(model, NAME, state)


def merge(model):
    """Fold W += scale * B @ A into every base layer and unwrap; returns the plain transformers model."""
    return modules.merge_layers(model, NAME, fold, "LoRA")


# --------------------------------------------------------------------------------------------------
# Counting from shapes: what inject() adds, by the same rules (layout.py) on names and sizes


def count(shapes: Shapes, config: Config, saved: list[str]) -> tuple[int, int]:
    """(trainable, added) parameters of LoRA on the model `shapes` describes; `saved`: modules trained in
    full (counted by the caller)."""
    targets = config.target_modules
    if targets is None:
        targets = layout.default_targets(shapes.model_type)
    skip = {shapes.output_head} if targets == "all-linear" and shapes.output_head else set()
    names = layout.select_targets(list(shapes.linears), targets, skip)
    names = [n for n in names if not layout.inside(n, saved)]
    layers = [shapes.linears[n] for n in names]
    if not layers or any(config.rank > min(x.in_features, x.out_features) for x in layers):
        raise NotModelled("inject() refuses this")
    added = sum(config.rank * (x.in_features + x.out_features) for x in layers)
    return added, added


# --------------------------------------------------------------------------------------------------
# adapter_config.json, both ways


def adapter_config(model, config: Config, task: str) -> dict:
    """The LoRA fields of HF PEFT's adapter_config.json, enough for ``PeftModel.from_pretrained``."""
    layers = lora_layers(model)
    if not layers:
        raise modules.AdapterError("the model holds no LoRA layers: nothing to describe")
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "r": config.rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_names(model, [name for name, _ in layers]),
        "exclude_modules": None,
        "use_rslora": config.use_rslora,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "modules_to_save": saved_modules(config, task)[0] or None,
        "bias": "none",
        # HF PEFT's flag for weights stored (in, out); it sets it for Conv1D layers itself as well.
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "use_dora": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _target_names(model, wrapped: list[str]) -> list[str]:
    """The leaf names (``q_proj``) when they pick out exactly the wrapped layers, else the full names.

    HF PEFT matches a list entry as the full name or a ``.``-suffix, against every module; a regex or a
    path-qualified target may have chosen a subset that the bare leaf names would overshoot.
    """
    leaves = sorted({name.rsplit(".", 1)[-1] for name in wrapped})
    picked = {
        name
        for name, _ in model.named_modules()
        if name and any(name == leaf or name.endswith("." + leaf) for leaf in leaves)
    }
    return leaves if picked == set(wrapped) else list(wrapped)


# Fields whose non-default value changes the adapter's math or which layers it covers. The defaults
# are what HF PEFT writes for a plain LoRA.
_UNSUPPORTED: dict[str, object] = {
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "exclude_modules": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "target_parameters": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "velora_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "megatron_config": None,
}
# init_lora_weights values that only shape the starting point; a trained adapter loads as plain LoRA.
# (PiSSA/OLoRA/CorDA also rewrite the base weights: such an adapter belongs with that residual base.)
_INIT_ONLY = ("pissa", "olora", "corda", "loftq", "eva", "orthogonal", "lora_ga", "mica")


def config_from_adapter(fields: dict) -> Config:
    """The Config of an adapter_config.json written here or by HF PEFT."""
    for field, default in _UNSUPPORTED.items():
        value = fields.get(field, default)
        if value != default and (default or value):  # [] or {} for None: still the default
            raise UserError(
                f"adapter_config.json: {field} = {value!r} is not supported by peftcli's LoRA "
                f"(it changes the adapter's math or layers; supported: {default!r})"
            )
    rank, alpha = fields.get("r", 8), fields.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise UserError(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise UserError(f"adapter_config.json: lora_alpha must be a positive number, got {alpha!r}")
    init = fields.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() == "gaussian":
        init = "gaussian"
    elif init is True:
        init = "kaiming"
    elif init is False or (isinstance(init, str) and init.lower().startswith(_INIT_ONLY)):
        log.info(
            "adapter_config.json: init_lora_weights = %r only sets the starting point; "
            "loaded as plain LoRA (initialised like HF PEFT's default)",
            init,
        )
        init = "kaiming"
    else:
        raise UserError(f"adapter_config.json: init_lora_weights = {init!r} is not a known initialisation")
    targets = fields.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        targets = sorted(targets)  # HF PEFT writes a set; order never matters for matching
    modules_to_save = fields.get("modules_to_save")
    return Config(
        rank=rank,
        alpha=float(alpha),
        dropout=float(fields.get("lora_dropout", 0.0) or 0.0),
        target_modules=targets,
        use_rslora=bool(fields.get("use_rslora", False)),
        init=init,
        modules_to_save=list(modules_to_save) if modules_to_save is not None else None,
    )
