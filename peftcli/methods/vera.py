"""VeRA: shared frozen random projections, trained scaling vectors — Kopiczko et al. 2024, arXiv:2310.11454.

Vector-based Random Matrix Adaptation keeps LoRA's low-rank form but freezes both factors: one pair of random
matrices A: (r, in_max) and B: (out_max, r) serves every adapted layer, each layer reading the top-left slice
that fits it, and only two vectors per layer train, d: (r,) and b: (out,):

    y = W x + bias + b * (B[:out] (d * (A[:, :in] dropout(x))))     i.e.  delta W = diag(b) B diag(d) A

b starts at zero (the model equals the base model at init) and d at ``d_initial`` (0.1, the paper's Table
6c). A and B are He-uniform draws from a CPU generator seeded with ``projection_prng_key``, A first, in
float32, then cast to the base's dtype: HF PEFT's recipe, so the same key gives the same projections there and
here. With ``save_projection`` (the default) the adapter file holds them once (``base_model.vera_A``,
``base_model.vera_B``) and loading takes them from the file; without it they are drawn again from the key.
Per layer the file holds ``<module path>.vera_lambda_b`` and ``.vera_lambda_d`` (``peft_type: VERA``).

The projections are data, not shapes: they are drawn even on a meta-device base (and stay on the CPU there),
so `peft merge`'s plan, made on the meta model, folds with them. This module imports no torch until a layer
is built (peftcli/lazy.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from peftcli.lazy import F, LazyModule, nn, torch
from peftcli.methods import layout
from peftcli.methods.base import (
    TARGETS_ACCEPTS,
    Context,
    Fail,
    MethodConfig,
    bool_field,
    check_positive,
    check_targets,
    count_layers,
    int_field,
    modules_to_save_field,
    number_field,
    refuse_unsupported,
    saved_modules,
    targets_field,
    targets_or_default,
)

if TYPE_CHECKING:
    from torch import Tensor

    from peftcli.methods.modules import AdaptedLayer
    from peftcli.models.shapes import Shapes

modules = LazyModule("peftcli.methods.modules")
targeting = LazyModule("peftcli.methods.targeting")
log = logging.getLogger(__name__)

NAME = "vera"
PEFT_TYPE = "VERA"
MERGEABLE = True
# The learning rate a recipe gets when it sets none. VeRA trains a few scaling vectors (38k on the quickstart
# model), at far higher rates than LoRA's (Kopiczko et al. 2024, arXiv:2310.11454, use 4e-3 for instruction
# tuning over a whole epoch). Measured on the quickstart comparison (40 steps, `peft compare
# configs/compare.yaml`): held-out loss 3.54 -> 3.17 at 4e-3, 2.50 at 1e-2, 1.57 at 2e-2.
LEARNING_RATE = 2e-2

# The architecture's usual targets: LoRA's, except Phi's (HF PEFT's VeRA mapping).
TARGETS: dict[str, list[str]] = {**layout.DEFAULT_TARGETS, "phi": ["q_proj", "v_proj"]}
# torch.Generator.manual_seed's range
SEED_RANGE = (-(2**63), 2**64 - 1)
PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")


@dataclass
class Config(MethodConfig):
    name: ClassVar[str] = NAME
    ACCEPTS: ClassVar[dict[str, str]] = {**MethodConfig.ACCEPTS, "target_modules": TARGETS_ACCEPTS}

    rank: int = 256  # r of the shared projections: higher than LoRA's, each layer trains only out + r values
    dropout: float = 0.0
    d_initial: float = 0.1  # d's value at init (b starts at zero)
    projection_prng_key: int = 0  # seeds the shared random projections
    save_projection: bool = True  # keep the projections in the adapter file (else: drawn again from the key)
    # None: the architecture's usual targets (LoRA's); all-linear; names / `.`-suffixes; a regex.
    target_modules: list[str] | str | None = None

    def check(self, fail: Fail) -> None:
        check_positive(self, "rank", fail)
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"must be in [0, 1), got {self.dropout}")
        low, high = SEED_RANGE
        if not low <= self.projection_prng_key <= high:
            fail(
                "projection_prng_key",
                f"must be in [{low}, {high}] (a torch seed), got {self.projection_prng_key}",
            )
        check_targets(self.target_modules, fail)


# --------------------------------------------------------------------------------------------------
# The layer


def run(layer: AdaptedLayer, x: Tensor) -> Tensor:
    """y = base(x) + b * (B (d * (A dropout(x)))); x: (..., in) -> (..., out).

    A: (r, in) and B: (out, r), this layer's slices of the shared projections; the scaled path runs in the
    vectors' dtype (float32 on a half-precision base) and is added in the base's dtype.
    """
    out = layer.base(x)
    b, d = layer.vera_lambda_b, layer.vera_lambda_d
    h = x if layer.dropout is None else layer.dropout(x)
    if h.dtype != d.dtype and not torch.is_autocast_enabled(h.device.type):
        h = h.to(d.dtype)
    proj_a, proj_b = projection_slices(layer, h.dtype)
    # (..., in) @ (in, r) -> (..., r), times d; @ (r, out) -> (..., out), times b
    return out + (b * F.linear(d * F.linear(h, proj_a), proj_b)).to(out.dtype)


def projection_slices(layer: AdaptedLayer, dtype) -> tuple[Tensor, Tensor]:
    """(A[:, :in], B[:out]) of the shared projections, for this layer's shape, in `dtype`."""
    shared = layer.shared
    return (
        shared.vera_A[:, : layer.in_features].to(dtype),
        shared.vera_B[: layer.out_features].to(dtype),
    )


def wrap_layer(base, shared, rank: int, dropout: float = 0.0, d_initial: float = 0.1) -> AdaptedLayer:
    """A frozen nn.Linear or GPT-2 Conv1D reading the `shared` projections, with its two trained vectors."""
    layer = modules.AdaptedLayer(base, NAME, run, "VeRALinear", casts_input=True, rank=rank)
    layer.shared = shared  # one module object for every layer: the projections exist once
    layer.dropout = nn.Dropout(dropout) if dropout > 0 else None
    factory = modules.parameter_factory(base)  # on the meta device: shapes only
    layer.vera_lambda_b = nn.Parameter(torch.zeros(layer.out_features, **factory))
    layer.vera_lambda_d = nn.Parameter(torch.full((rank,), float(d_initial), **factory))
    return layer


def draw_projections(rank: int, in_max: int, out_max: int, seed: int) -> tuple[Tensor, Tensor]:
    """(A: (r, in_max), B: (out_max, r)): He-uniform (gain sqrt 2) on fan-in, A drawn first, from one CPU
    generator seeded with `seed`, float32."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def he_uniform(rows: int, fan_in: int) -> Tensor:
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))
        return torch.empty(rows, fan_in).uniform_(-bound, bound, generator=generator)

    return he_uniform(rank, in_max), he_uniform(out_max, rank)


def projections(config: Config, layers: list, factory: dict):
    """The shared projections for `layers` (the base layers to wrap): as large as the largest of them, in
    `factory`'s dtype and on its device (modules.parameter_factory; on the CPU for a meta-device base)."""
    in_max = max(modules.layer_shape(layer)[0] for layer in layers)
    out_max = max(modules.layer_shape(layer)[1] for layer in layers)
    proj_a, proj_b = draw_projections(config.rank, in_max, out_max, config.projection_prng_key)
    device = "cpu" if factory["device"].type == "meta" else factory["device"]
    tensors = {"vera_A": proj_a.to(device, factory["dtype"]), "vera_B": proj_b.to(device, factory["dtype"])}
    return modules.SharedTensors(tensors, saved=config.save_projection)


def delta_weight(layer: AdaptedLayer) -> Tensor:
    """diag(b) B diag(d) A, laid out like the base weight ((out, in), or (in, out) for a Conv1D), in at
    least float32."""
    dtype = torch.promote_types(layer.vera_lambda_b.dtype, torch.float32)
    proj_a, proj_b = projection_slices(layer, dtype)
    b, d = layer.vera_lambda_b.to(dtype), layer.vera_lambda_d.to(dtype)
    delta = (b[:, None] * proj_b) @ (d[:, None] * proj_a)  # (out, r) @ (r, in)
    return delta.T if layer.fan_in_fan_out else delta


def fold(layer: AdaptedLayer, weight: Tensor) -> Tensor:
    """The base weight with the update folded in, added in float32 and rounded once."""
    delta = delta_weight(layer)
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


def vera_layers(model) -> list[tuple[str, AdaptedLayer]]:
    return modules.adapted_layers(model, NAME)


# --------------------------------------------------------------------------------------------------
# The method contract


def inject(model, config: Config, context: Context):
    """Freeze `model`, draw the shared projections and wrap each target layer, in place; returns `model`."""
    targets = targets_or_default(config.target_modules, modules.model_type(model), "VeRA", TARGETS)
    names = targeting.claim_targets(model, NAME, "VeRA", targets, config, context.task)
    bases = [model.get_submodule(name) for name in names]
    shared = projections(config, bases, modules.parameter_factory(bases[0]))
    for name, base in zip(names, bases, strict=True):
        layer = wrap_layer(base, shared, config.rank, config.dropout, config.d_initial)
        modules.set_submodule(model, name, layer)
    modules.wrap_modules_to_save(model, *saved_modules(config, context.task))
    return model


def adapter_state(model) -> dict[str, Tensor]:
    """The vectors, the projections (with save_projection) and the modules trained in full."""
    return modules.layer_state(model, NAME)


def load_adapter_state(model, state: dict[str, Tensor]) -> None:
    """Without save_projection the projections come from the key: any in the file are left out, as HF PEFT
    leaves them."""
    saved = bool(modules.shared_tensors(model, NAME, saved_only=True))
    if not saved and any(k in state for k in PROJECTION_KEYS):
        log.warning("save_projection is false: the projections in the adapter file are not used")
        state = {k: v for k, v in state.items() if k not in PROJECTION_KEYS}
    if saved and vera_layers(model) and not all(k in state for k in PROJECTION_KEYS):
        raise modules.AdapterError(
            "adapter_config.json says save_projection is true but the adapter file holds no projections "
            f"({', '.join(PROJECTION_KEYS)})"
        )
    modules.load_layer_state(model, NAME, state)


def merge(model):
    """Fold W += diag(b) B diag(d) A into every base layer and unwrap; returns the plain model."""
    return modules.merge_layers(model, NAME, fold, "VeRA")


# --------------------------------------------------------------------------------------------------
# Counting from shapes


def count(shapes: Shapes, config: Config, saved: list[str]) -> tuple[int, int]:
    """(trainable, added): b and d per layer; the projections are buffers, which HF PEFT does not count."""
    targets = targets_or_default(config.target_modules, shapes.model_type, "VeRA", TARGETS)
    return count_layers(shapes, targets, saved, lambda _, linear: linear.out_features + config.rank)


# --------------------------------------------------------------------------------------------------
# adapter_config.json, both ways


def adapter_config(model, config: Config, task: str) -> dict:
    """The VeRA fields of HF PEFT's adapter_config.json, enough for ``PeftModel.from_pretrained``."""
    layers = vera_layers(model)
    if not layers:
        raise modules.AdapterError("the model holds no VeRA layers: nothing to describe")
    return {
        "r": config.rank,
        "target_modules": targeting.config_target_names(model, [name for name, _ in layers]),
        "projection_prng_key": config.projection_prng_key,
        "save_projection": config.save_projection,
        "vera_dropout": config.dropout,
        "d_initial": config.d_initial,
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "bias": "none",
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": saved_modules(config, task)[0] or None,
    }


# Fields whose non-default value changes the adapter's math or which layers it covers.
_UNSUPPORTED: dict[str, object] = {
    "bias": "none",
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
}


def config_from_adapter(fields: dict) -> Config:
    """The Config of an adapter_config.json written here or by HF PEFT.

    ``fan_in_fan_out`` follows the layer (HF PEFT also sets it from the layer's type) and ``init_weights``
    only shapes the starting point: both are read and not needed.
    """
    refuse_unsupported(fields, _UNSUPPORTED, "VeRA")
    bool_field(fields, "fan_in_fan_out", False)
    bool_field(fields, "init_weights", True)
    key = int_field(fields, "projection_prng_key", 0, minimum=SEED_RANGE[0])
    return Config(
        rank=int_field(fields, "r", 256),
        dropout=number_field(fields, "vera_dropout", 0.0, high=1.0),
        d_initial=number_field(fields, "d_initial", 0.1, low=-math.inf),
        projection_prng_key=key,
        save_projection=bool_field(fields, "save_projection", True),
        target_modules=targets_field(fields),
        modules_to_save=modules_to_save_field(fields),
    )
