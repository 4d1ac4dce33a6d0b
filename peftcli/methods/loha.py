"""LoHa: a Hadamard product of two low-rank products — FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098, as
the LyCORIS project adapted it to fine-tuning.

    delta_W = (alpha / r) * (W1a W1b) ⊙ (W2a W2b),    W1a, W2a: (out, r),  W1b, W2b: (r, in)

The elementwise product of two rank-r matrices can reach rank r^2, for the parameters of a rank-2r LoRA.
W1a, W1b and W2a start He-uniform, W2b at zero (so the model equals the base model at init; with
``init_weights: false`` all four are random). The update is added to the frozen layer (lycoris.py: the
forward, merging, rank and module dropout). Saved as HF PEFT saves it (``peft_type: LOHA``):
``<module path>.hada_w1_a``, ``.hada_w1_b``, ``.hada_w2_a``, ``.hada_w2_b``. This module imports no torch
until a layer is built (peftcli/lazy.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from peftcli.lazy import LazyModule, nn, torch
from peftcli.methods import lycoris
from peftcli.methods.base import (
    Context,
    bool_field,
    count_layers,
    targets_or_default,
)

if TYPE_CHECKING:
    from torch import Tensor

    from peftcli.methods.modules import AdaptedLayer
    from peftcli.models.shapes import Shapes

modules = LazyModule("peftcli.methods.modules")
targeting = LazyModule("peftcli.methods.targeting")

NAME = "loha"
PEFT_TYPE = "LOHA"
MERGEABLE = True
# The learning rate a recipe gets when it sets none (no published default of its own). Its update is the
# product of two low-rank products, one of them zero at init, so it starts slower than LoRA's: measured on
# the quickstart comparison (40 steps, `peft compare configs/compare.yaml`), held-out loss 3.54 -> 3.52 at
# LoRA's 2e-4, 2.77 at 2e-3, 1.42 at 5e-3.
LEARNING_RATE = 5e-3


@dataclass
class Config(lycoris.Config):
    name: ClassVar[str] = NAME

    init_weights: bool = True  # false: W2b random too, so the model no longer starts as the base model


# --------------------------------------------------------------------------------------------------
# The layer


def delta_weight(layer: AdaptedLayer, dtype=None) -> Tensor:
    """(alpha / r) * (W1a W1b) ⊙ (W2a W2b): (out, in), in `dtype` (default: the factors')."""
    w1a, w1b, w2a, w2b = (
        p if dtype is None else p.to(dtype)
        for p in (layer.hada_w1_a, layer.hada_w1_b, layer.hada_w2_a, layer.hada_w2_b)
    )
    return ((w1a @ w1b) * (w2a @ w2b)) * layer.scale  # (out, r) @ (r, in), twice


def run(layer: AdaptedLayer, x: Tensor) -> Tensor:
    """y = base(x) + x delta_W^T; x: (..., in) -> (..., out) (lycoris.run)."""
    return lycoris.run(layer, x, delta_weight)


def wrap_layer(base, config: Config) -> AdaptedLayer:
    """A frozen nn.Linear or GPT-2 Conv1D with LoHa's four factors beside it."""
    layer = modules.AdaptedLayer(
        base, NAME, run, "LoHaLinear", casts_input=True, rescale_kept=True, **lycoris.layer_settings(config)
    )
    factory = modules.parameter_factory(base)  # on the meta device: shapes only
    rank, out_features, in_features = config.rank, layer.out_features, layer.in_features
    shapes = {
        "hada_w1_a": (out_features, rank),
        "hada_w1_b": (rank, in_features),
        "hada_w2_a": (out_features, rank),
        "hada_w2_b": (rank, in_features),
    }
    for part, shape in shapes.items():
        factor = nn.Parameter(torch.empty(shape, **factory))
        setattr(layer, part, factor)
        if part == "hada_w2_b" and config.init_weights:
            nn.init.zeros_(factor)  # one zero factor: delta_W = 0 at init
        else:
            nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
    return layer


def fold(layer: AdaptedLayer, weight: Tensor) -> Tensor:
    """W + delta_W, in float32, rounded once."""
    return lycoris.fold(layer, weight, delta_weight(layer, lycoris.fold_dtype(layer)))


def loha_layers(model) -> list[tuple[str, AdaptedLayer]]:
    return modules.adapted_layers(model, NAME)


# --------------------------------------------------------------------------------------------------
# The method contract


def inject(model, config: Config, context: Context):
    """Freeze `model` and wrap each target layer with LoHa's factors, in place; returns `model`."""
    targets = targets_or_default(config.target_modules, modules.model_type(model), "LoHa")
    return targeting.inject_layers(
        model, config, context, NAME, "LoHa", targets, lambda _, base: wrap_layer(base, config)
    )


def adapter_state(model) -> dict[str, Tensor]:
    return modules.layer_state(model, NAME)


def load_adapter_state(model, state: dict[str, Tensor]) -> None:
    modules.load_layer_state(model, NAME, state)


def merge(model):
    """Fold W += delta_W into every base layer and unwrap; returns the plain transformers model."""
    return modules.merge_layers(model, NAME, fold, "LoHa")


# --------------------------------------------------------------------------------------------------
# Counting from shapes


def count(shapes: Shapes, config: Config, saved: list[str]) -> tuple[int, int]:
    """(trainable, added): two (out, r) and two (r, in) factors per layer."""
    targets = targets_or_default(config.target_modules, shapes.model_type, "LoHa")
    return count_layers(
        shapes, targets, saved, lambda _, x: 2 * config.rank * (x.in_features + x.out_features)
    )


# --------------------------------------------------------------------------------------------------
# adapter_config.json, both ways


def adapter_config(model, config: Config, task: str) -> dict:
    """The LoHa fields of HF PEFT's adapter_config.json."""
    layers = loha_layers(model)
    if not layers:
        raise modules.AdapterError("the model holds no LoHa layers: nothing to describe")
    targets = targeting.config_target_names(model, [name for name, _ in layers])
    return {**lycoris.adapter_config(model, config, task, targets), "init_weights": config.init_weights}


def config_from_adapter(fields: dict) -> Config:
    """The Config of an adapter_config.json written here or by HF PEFT."""
    shared = lycoris.config_fields(fields, "LoHa")
    return Config(**shared, init_weights=bool_field(fields, "init_weights", True))
