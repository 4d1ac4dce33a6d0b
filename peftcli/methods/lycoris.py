"""What LoHa and LoKr share, as HF PEFT implements the LyCORIS family: a full-size update built from small
factors, added to a frozen linear layer.

    y = W x + b + delta_W x,    delta_W = (alpha / r) * f(factors): (out, in)

Each method's module says what f is (loha.py: a Hadamard product of two low-rank products, lokr.py: a
Kronecker product). In training two regularisers may drop parts of the update: ``rank_dropout`` zeroes rows
of delta_W (each output feature with that probability; LoHa always rescales the kept rows by the kept
fraction, LoKr with ``rank_dropout_scale``), and ``module_dropout`` skips the whole update of a layer for a
step. Neither touches the saved adapter or inference. Merging adds delta_W to W.

The update is a full (out, in) matrix, built each forward from the factors: the layer's input meets it in
one product. HF PEFT 0.21 applies these methods to nn.Linear (and convolutions) only; GPT-2's Conv1D layers
are adapted here as the linear maps they are, same factor shapes (delta_W transposed into the Conv1D's
(in, out) weight when merging), which HF PEFT then refuses to load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from peftcli.lazy import F, torch
from peftcli.methods.base import (
    TARGETS_ACCEPTS,
    Fail,
    MethodConfig,
    adapter_field_error,
    alpha_number,
    check_positive,
    check_targets,
    int_field,
    modules_to_save_field,
    number_field,
    refuse_unsupported,
    saved_modules,
    targets_field,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor

    from peftcli.methods.modules import AdaptedLayer


@dataclass
class Config(MethodConfig):
    """The recipe keys LoHa and LoKr share; each method's Config adds its own."""

    ACCEPTS: ClassVar[dict[str, str]] = {**MethodConfig.ACCEPTS, "target_modules": TARGETS_ACCEPTS}

    rank: int = 8
    alpha: float = 8.0  # delta_W is scaled by alpha / rank
    rank_dropout: float = 0.0  # in training, each row of delta_W dropped with this probability
    module_dropout: float = 0.0  # in training, a layer's whole update skipped with this probability
    # None: the architecture's usual targets (LoRA's); all-linear; names / `.`-suffixes; a regex.
    target_modules: list[str] | str | None = None

    def check(self, fail: Fail) -> None:
        check_positive(self, "rank alpha", fail)
        for key in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                fail(key, f"must be in [0, 1), got {getattr(self, key)}")
        check_targets(self.target_modules, fail)


def layer_settings(config: Config) -> dict:
    """The AdaptedLayer settings every LyCORIS layer reads in `run`."""
    return {
        "rank": config.rank,
        "alpha": config.alpha,
        "scale": config.alpha / config.rank,
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
    }


# --------------------------------------------------------------------------------------------------
# The layer


def run(layer: AdaptedLayer, x: Tensor, delta_weight: Callable[[AdaptedLayer], Tensor]) -> Tensor:
    """y = base(x) + x delta_W^T; x: (..., in) -> (..., out). `delta_weight(layer)`: the method's (out, in)
    update, already scaled; the product runs in its dtype (the factors', float32 on a half-precision base)
    and is added in the base's."""
    out = layer.base(x)
    if layer.training and layer.module_dropout > 0 and float(torch.rand(1)) <= layer.module_dropout:
        return out  # this layer's update skipped for this step
    delta = drop_rows(layer, delta_weight(layer))
    return out + F.linear(x.to(delta.dtype), delta).to(out.dtype)


def drop_rows(layer: AdaptedLayer, delta: Tensor) -> Tensor:
    """In training with rank_dropout: delta_W with each row (output feature) zeroed with that probability,
    the kept rows divided by the kept fraction where the method rescales (``layer.rescale_kept``)."""
    if not (layer.training and layer.rank_dropout > 0):
        return delta
    keep = (torch.rand(delta.shape[0]) > layer.rank_dropout).to(delta.device, delta.dtype)
    if layer.rescale_kept:
        keep = keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)  # all dropped: zeros, not NaN
    return delta * keep[:, None]


def fold(layer: AdaptedLayer, weight: Tensor, delta: Tensor) -> Tensor:
    """W + delta_W, laid out like the base weight ((in, out) for a Conv1D), added in float32, rounded once."""
    delta = delta.T if layer.fan_in_fan_out else delta
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


def fold_dtype(layer: AdaptedLayer) -> torch.dtype:
    """The dtype a merge computes delta_W in: the factors', at least float32."""
    return torch.promote_types(next(iter(layer.parts().values())).dtype, torch.float32)


# --------------------------------------------------------------------------------------------------
# adapter_config.json, both ways


def adapter_config(model, config: Config, task: str, target_modules: list[str]) -> dict:
    """The fields LoHa's and LoKr's adapter_config.json share."""
    return {
        "r": config.rank,
        "alpha": alpha_number(config.alpha),
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
        "target_modules": target_modules,
        "exclude_modules": None,
        "use_effective_conv2d": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": saved_modules(config, task)[0] or None,
    }


# Fields whose non-default value changes the adapter's math or which layers it covers.
UNSUPPORTED: dict[str, object] = {
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
}


def config_fields(fields: dict, method: str) -> dict:
    """The shared Config fields of an adapter_config.json written here or by HF PEFT. ``use_effective_conv2d``
    only concerns convolutions, which these methods never wrap here: read and not needed."""
    refuse_unsupported(fields, UNSUPPORTED, method)
    fields.get("use_effective_conv2d")
    alpha = number_field(fields, "alpha", 8.0)
    if alpha <= 0:
        raise adapter_field_error("alpha", f"expected a positive number, got {alpha!r}")
    return {
        "rank": int_field(fields, "r", 8),
        "alpha": alpha,
        "rank_dropout": number_field(fields, "rank_dropout", 0.0, high=1.0),
        "module_dropout": number_field(fields, "module_dropout", 0.0, high=1.0),
        "target_modules": targets_field(fields),
        "modules_to_save": modules_to_save_field(fields),
    }
