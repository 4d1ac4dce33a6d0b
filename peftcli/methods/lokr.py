"""LoKr: a Kronecker product of two small factors — Yeh et al. 2024 (LyCORIS), arXiv:2309.14859.

    delta_W = (alpha / r) * W1 ⊗ W2,    W1: (out_l, in_m),  W2: (out_k, in_n)
    out = out_l out_k,  in = in_m in_n

Each dimension is split into two factors (``factorization``: the divisor pair nearest its square root, or
``decompose_factor`` and its cofactor), so W1 and W2 are tiny and their Kronecker product is full size and
full rank. A factor is itself a rank-r product (W2 = W2a W2b: (out_k, r) @ (r, in_n)) where r is below half
its larger side; W1 stays whole unless ``decompose_both``. At init W1 (or W1a) is zero and the rest
He-uniform, so the model equals the base model; ``init_weights: lycoris`` zeroes W2 (or W2b) instead, and
false draws everything. The update is added to the frozen layer (lycoris.py: the forward, merging, rank and
module dropout). Saved as HF PEFT saves it (``peft_type: LOKR``): ``<module path>.lokr_w1`` or
``.lokr_w1_a`` / ``.lokr_w1_b``, and ``.lokr_w2`` or ``.lokr_w2_a`` / ``.lokr_w2_b``. This module imports no
torch until a layer is built (peftcli/lazy.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from peftcli.errors import UserError
from peftcli.lazy import LazyModule, nn, torch
from peftcli.methods import lycoris
from peftcli.methods.base import (
    Context,
    Fail,
    adapter_field_error,
    bool_field,
    count_layers,
    int_field,
    targets_or_default,
)

if TYPE_CHECKING:
    from torch import Tensor

    from peftcli.methods.modules import AdaptedLayer
    from peftcli.models.shapes import Shapes

modules = LazyModule("peftcli.methods.modules")
targeting = LazyModule("peftcli.methods.targeting")

NAME = "lokr"
PEFT_TYPE = "LOKR"
MERGEABLE = True
# The learning rate a recipe gets when it sets none (no published default of its own). Its factors are
# few (47k on the quickstart model against LoRA's 4.9M) and the Kronecker product of a zero W1 starts slow:
# measured on the quickstart comparison (40 steps, `peft compare configs/compare.yaml`), held-out loss
# 3.54 -> 3.47 at LoRA's 2e-4, 2.73 at 2e-3, 1.07 at 1e-2.
LEARNING_RATE = 1e-2


@dataclass
class Config(lycoris.Config):
    name: ClassVar[str] = NAME
    ACCEPTS: ClassVar[dict[str, str]] = {**lycoris.Config.ACCEPTS, "init_weights": "true, false or lycoris"}

    rank_dropout_scale: bool = False  # divide the rows rank dropout keeps by the kept fraction
    decompose_both: bool = False  # W1 a rank-r product too (where r is below half its larger side)
    decompose_factor: int = -1  # split each dimension as (this, dim / this) where it divides; -1: near sqrt
    # true: W1 zero (the base model at init); lycoris: W2 zero instead; false: all random
    init_weights: bool | Literal["lycoris"] = True

    def check(self, fail: Fail) -> None:
        super().check(fail)
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            fail("decompose_factor", f"must be -1 (near the square root) or > 0, got {self.decompose_factor}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension: (factor, dimension / factor) where factor > 0 divides dimension; else
    the divisor pair nearest the square root whose smaller member is at most `factor` (-1: no bound),
    smaller first. 256 -> (16, 16), 128 -> (8, 16), 127 -> (1, 127); 128 with factor 4 -> (4, 32)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:  # walk up the divisors while the smaller one stays within the bound
        divisor = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if divisor > bound:
            break
        m, n = divisor, dimension // divisor
    return min(m, n), max(m, n)


def factor_shapes(in_features: int, out_features: int, config: Config) -> tuple[tuple, tuple, bool, bool]:
    """(W1's shape, W2's shape, W1 whole, W2 whole) for a layer in_features -> out_features."""
    in_m, in_n = factorization(in_features, config.decompose_factor)
    out_l, out_k = factorization(out_features, config.decompose_factor)
    whole_w1 = not (config.decompose_both and config.rank < max(out_l, in_m) / 2)
    whole_w2 = not (config.rank < max(out_k, in_n) / 2)
    return (out_l, in_m), (out_k, in_n), whole_w1, whole_w2


def factor_parameters(in_features: int, out_features: int, config: Config) -> int:
    """LoKr's parameters on one layer: each factor whole (rows x cols) or as a rank-r product."""
    shape1, shape2, whole_w1, whole_w2 = factor_shapes(in_features, out_features, config)
    return sum(
        rows * cols if whole else config.rank * (rows + cols)
        for (rows, cols), whole in ((shape1, whole_w1), (shape2, whole_w2))
    )


# --------------------------------------------------------------------------------------------------
# The layer


def delta_weight(layer: AdaptedLayer, dtype=None) -> Tensor:
    """(alpha / r) * W1 ⊗ W2: (out_l out_k, in_m in_n) = (out, in), in `dtype` (default: the factors')."""
    factor1, factor2 = (_factor(layer, i, dtype) for i in (1, 2))
    return torch.kron(factor1, factor2) * layer.scale


def _factor(layer: AdaptedLayer, i: int, dtype) -> Tensor:
    """W_i, whole or as the product W_ia W_ib."""
    whole = getattr(layer, f"lokr_w{i}", None)
    parts = [whole] if whole is not None else [getattr(layer, f"lokr_w{i}_a"), getattr(layer, f"lokr_w{i}_b")]
    parts = [p if dtype is None else p.to(dtype) for p in parts]
    return parts[0] if len(parts) == 1 else parts[0] @ parts[1]


def run(layer: AdaptedLayer, x: Tensor) -> Tensor:
    """y = base(x) + x delta_W^T; x: (..., in) -> (..., out) (lycoris.run)."""
    return lycoris.run(layer, x, delta_weight)


def wrap_layer(base, config: Config) -> AdaptedLayer:
    """A frozen nn.Linear or GPT-2 Conv1D with LoKr's factors beside it."""
    settings = {**lycoris.layer_settings(config), "rescale_kept": config.rank_dropout_scale}
    layer = modules.AdaptedLayer(base, NAME, run, "LoKrLinear", casts_input=True, **settings)
    shape1, shape2, whole_w1, whole_w2 = factor_shapes(layer.in_features, layer.out_features, config)
    factory = modules.parameter_factory(base)  # on the meta device: shapes only
    # which factor starts at zero: W1 (or W1a) by default, W2 (or W2b) the LyCORIS way, none when false
    zero = {True: {"lokr_w1", "lokr_w1_a"}, "lycoris": {"lokr_w2", "lokr_w2_b"}, False: set()}
    for i, (rows, cols), whole in ((1, shape1, whole_w1), (2, shape2, whole_w2)):
        if whole:
            parts = {f"lokr_w{i}": (rows, cols)}
        else:
            parts = {f"lokr_w{i}_a": (rows, config.rank), f"lokr_w{i}_b": (config.rank, cols)}
        for part, shape in parts.items():
            factor = nn.Parameter(torch.empty(shape, **factory))
            setattr(layer, part, factor)
            if part in zero[config.init_weights]:
                nn.init.zeros_(factor)
            else:
                nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
    return layer


def fold(layer: AdaptedLayer, weight: Tensor) -> Tensor:
    """W + delta_W, in float32, rounded once."""
    return lycoris.fold(layer, weight, delta_weight(layer, lycoris.fold_dtype(layer)))


def lokr_layers(model) -> list[tuple[str, AdaptedLayer]]:
    return modules.adapted_layers(model, NAME)


# --------------------------------------------------------------------------------------------------
# The method contract


def inject(model, config: Config, context: Context):
    """Freeze `model` and wrap each target layer with LoKr's factors, in place; returns `model`."""
    if not (isinstance(config.init_weights, bool) or config.init_weights == "lycoris"):
        raise UserError(f"method.init_weights: expected true, false or lycoris, got {config.init_weights!r}")
    targets = targets_or_default(config.target_modules, modules.model_type(model), "LoKr")
    return targeting.inject_layers(
        model, config, context, NAME, "LoKr", targets, lambda _, base: wrap_layer(base, config)
    )


def adapter_state(model) -> dict[str, Tensor]:
    return modules.layer_state(model, NAME)


def load_adapter_state(model, state: dict[str, Tensor]) -> None:
    modules.load_layer_state(model, NAME, state)


def merge(model):
    """Fold W += delta_W into every base layer and unwrap; returns the plain transformers model."""
    return modules.merge_layers(model, NAME, fold, "LoKr")


# --------------------------------------------------------------------------------------------------
# Counting from shapes


def count(shapes: Shapes, config: Config, saved: list[str]) -> tuple[int, int]:
    """(trainable, added): W1 and W2 per layer, each whole or as a rank-r product."""
    targets = targets_or_default(config.target_modules, shapes.model_type, "LoKr")
    return count_layers(
        shapes, targets, saved, lambda _, x: factor_parameters(x.in_features, x.out_features, config)
    )


# --------------------------------------------------------------------------------------------------
# adapter_config.json, both ways


def adapter_config(model, config: Config, task: str) -> dict:
    """The LoKr fields of HF PEFT's adapter_config.json."""
    layers = lokr_layers(model)
    if not layers:
        raise modules.AdapterError("the model holds no LoKr layers: nothing to describe")
    targets = targeting.config_target_names(model, [name for name, _ in layers])
    return {
        **lycoris.adapter_config(model, config, task, targets),
        "rank_dropout_scale": config.rank_dropout_scale,
        "decompose_both": config.decompose_both,
        "decompose_factor": config.decompose_factor,
        "init_weights": config.init_weights,
    }


def config_from_adapter(fields: dict) -> Config:
    """The Config of an adapter_config.json written here or by HF PEFT."""
    shared = lycoris.config_fields(fields, "LoKr")
    init = fields.get("init_weights", True)
    if not (isinstance(init, bool) or init == "lycoris"):
        raise adapter_field_error("init_weights", f"expected true, false or lycoris, got {init!r}")
    factor = int_field(fields, "decompose_factor", -1, minimum=-1)
    if factor == 0:
        raise adapter_field_error("decompose_factor", "expected -1 or a positive integer, got 0")
    return Config(
        **shared,
        rank_dropout_scale=bool_field(fields, "rank_dropout_scale", False),
        decompose_both=bool_field(fields, "decompose_both", False),
        decompose_factor=factor,
        init_weights=init,
    )
