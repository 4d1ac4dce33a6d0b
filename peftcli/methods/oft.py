"""OFT: an orthogonal rotation of the layer's input space — Qiu et al. 2023, arXiv:2306.07280.

Orthogonal Finetuning multiplies the frozen weight by a trained orthogonal matrix, which keeps the angles
between its neurons (the "hyperspherical energy") that pretraining found. The rotation R is block-diagonal,
k blocks of b x b (k b = in), each the Cayley transform of a skew-symmetric Q_i built from b(b-1)/2 trained
values:

    y = W (R^T x) + bias  (rows: y = (x R) W^T),   R = diag(R_1, ..., R_k),   W' = W R^T when merged

    R_i = (I + Q_i)(I - Q_i)^-1 ~ I + 2 Q_i + 2 Q_i^2 + ... + Q_i^(t-1)   (``use_cayley_neumann``, t terms)
    R_i = (I - Q_i)(I + Q_i)^-1                                           (exact: without it)

This is HF PEFT 0.21's OFT, kept exactly so that adapters move both ways: the rotation acts on the input
(its current form; before 0.16 it was another), the Neumann series is truncated as it truncates it (3 and
4 terms give the same series there), and the exact transform is the one it solves for, which rotates the
other way for the same Q (both are orthogonal). Q starts at zero, so R = I and the model equals the base
model at init (``init_weights: false``: Q ~ N(0, 0.1^2)). ``block_share`` trains one block for all k.
Each layer's block size is ``block_size`` (32 by default), or in / ``num_blocks``; a size that does not
divide the layer's input is moved to the nearest one that does, as HF PEFT moves it. Saved as HF PEFT saves
it (``peft_type: OFT``): ``<module path>.oft_R.weight``, (k, b(b-1)/2), or (1, ...) with block_share.

HF PEFT 0.21 applies OFT to nn.Linear (and convolutions, embeddings) only; GPT-2's Conv1D layers are rotated
here as the linear maps they are, which HF PEFT then refuses to load. This module imports no torch until a
layer is built (peftcli/lazy.py).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from peftcli.errors import UserError
from peftcli.lazy import LazyModule, nn, torch
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

NAME = "oft"
PEFT_TYPE = "OFT"
MERGEABLE = True
# The learning rate a recipe gets when it sets none: no published default of its own; LoRA's (HF PEFT's
# examples train it at LoRA's rates).
LEARNING_RATE = 2e-4
DEFAULT_BLOCK_SIZE = 32
HF_PEFT_FORMAT = "0.21.0"


@dataclass
class Config(MethodConfig):
    name: ClassVar[str] = NAME
    ACCEPTS: ClassVar[dict[str, str]] = {
        **MethodConfig.ACCEPTS,
        "target_modules": TARGETS_ACCEPTS,
        "block_size": "a positive integer, or null (32 unless num_blocks is set)",
        "num_blocks": "a positive integer, or null (use block_size)",
    }

    # Set one of the two: the size b of each rotation block (null and no num_blocks: 32; HF PEFT's
    # oft_block_size) or the number of blocks k per layer (HF PEFT's r).
    block_size: int | None = None
    num_blocks: int | None = None
    use_cayley_neumann: bool = True  # the Neumann series instead of the exact (slower) Cayley transform
    num_cayley_neumann_terms: int = 5
    block_share: bool = False  # one block, shared by every block of a layer
    init_weights: bool = True  # false: a random rotation at init, not the base model
    # None: the architecture's usual targets (LoRA's); all-linear; names / `.`-suffixes; a regex.
    target_modules: list[str] | str | None = None

    def check(self, fail: Fail) -> None:
        check_positive(self, "block_size num_blocks num_cayley_neumann_terms", fail)
        if self.block_size is not None and self.num_blocks is not None:
            fail(
                "num_blocks", "set block_size or num_blocks, not both (block_size x num_blocks = in_features)"
            )
        check_targets(self.target_modules, fail)


def nearest_divisor(in_features: int, value: int) -> int:
    """HF PEFT's repair of a block size (or count) that does not divide in_features: the nearest divisor,
    the lower one on a tie; in_features itself for a value at or above it."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def blocks(in_features: int, config: Config) -> tuple[int, int]:
    """(number of blocks k, block size b) for a layer of `in_features` inputs: k b = in_features."""
    if config.num_blocks is not None:
        count = config.num_blocks
        if in_features % count:
            count = nearest_divisor(in_features, count)
        return count, in_features // count
    size = config.block_size or DEFAULT_BLOCK_SIZE
    if in_features % size or size > in_features:
        size = nearest_divisor(in_features, size)
    return in_features // size, size


def trained_values(in_features: int, config: Config) -> int:
    """The trained values of one layer: b(b-1)/2 per block, one block with block_share."""
    count, size = blocks(in_features, config)
    return (1 if config.block_share else count) * size * (size - 1) // 2


# --------------------------------------------------------------------------------------------------
# The layer


def skew_symmetric(values: Tensor, size: int) -> Tensor:
    """(rows, b(b-1)/2) -> (rows, b, b): the values above the diagonal, row by row, minus their mirror."""
    upper = torch.zeros(values.shape[0], size, size, device=values.device, dtype=values.dtype)
    rows, cols = torch.triu_indices(size, size, 1, device=values.device)
    upper[:, rows, cols] = values
    return upper - upper.transpose(-2, -1)


def neumann_coefficients(terms: int) -> list[int]:
    """The coefficients of I, Q, Q^2, ... in HF PEFT's truncated series for (I + Q)(I - Q)^-1 with `terms`
    terms: 1: [1]; 2: [1, 2]; t >= 3: 1, then 2 up to Q^(max(3, t-1) - 1), then 1."""
    if terms <= 2:
        return [1, 2][:terms]
    return [1] + [2] * (max(3, terms - 1) - 1) + [1]


def rotations(layer: AdaptedLayer) -> Tensor:
    """The layer's rotation blocks R_i, (k, b, b), in its trained values' dtype."""
    weight = layer.oft_R.weight  # (k or 1, b(b-1)/2)
    q = skew_symmetric(weight, layer.block_size)
    eye = torch.eye(layer.block_size, device=q.device, dtype=q.dtype).expand_as(q)
    if layer.use_cayley_neumann:
        rotation, power = eye.clone(), eye
        for coefficient in neumann_coefficients(layer.num_cayley_neumann_terms)[1:]:
            power = power @ q
            rotation = rotation + coefficient * power
    else:
        rotation = torch.linalg.solve(eye + q, eye - q, left=False)  # R (I + Q) = I - Q
    return rotation.expand(layer.num_blocks, -1, -1) if layer.block_share else rotation


def run(layer: AdaptedLayer, x: Tensor) -> Tensor:
    """y = base(x R); x: (..., in) -> (..., out). The input is cut into k blocks of b features, each rotated
    by its R_i, in the trained values' dtype (float32 on a half-precision base), then rounded back."""
    rotation = rotations(layer)  # (k, b, b)
    h = x.to(rotation.dtype)
    rotated = torch.einsum(
        "...ki,kio->...ko", h.unflatten(-1, (layer.num_blocks, layer.block_size)), rotation
    )
    return layer.base(rotated.flatten(-2).to(x.dtype))


def wrap_layer(base, config: Config) -> AdaptedLayer:
    """A frozen nn.Linear or GPT-2 Conv1D behind its block rotation, the identity at init."""
    in_features, _ = modules.layer_shape(base)
    count, size = blocks(in_features, config)
    layer = modules.AdaptedLayer(
        base,
        NAME,
        run,
        "OFTLinear",
        casts_input=True,
        num_blocks=count,
        block_size=size,
        block_share=config.block_share,
        use_cayley_neumann=config.use_cayley_neumann,
        num_cayley_neumann_terms=config.num_cayley_neumann_terms,
    )
    rows = 1 if config.block_share else count
    layer.oft_R = nn.Module()  # HF PEFT's key: <module path>.oft_R.weight
    shape = (rows, size * (size - 1) // 2)
    layer.oft_R.weight = nn.Parameter(torch.zeros(shape, **modules.parameter_factory(base)))
    if not config.init_weights:
        nn.init.normal_(layer.oft_R.weight, mean=0.0, std=0.1)
    return layer


def fold(layer: AdaptedLayer, weight: Tensor) -> Tensor:
    """W R^T (a Linear's (out, in) weight), or R W for a Conv1D's (in, out), block by block, in float32."""
    dtype = torch.promote_types(layer.oft_R.weight.dtype, torch.float32)
    rotation = rotations(layer).to(dtype)  # (k, b, b)
    w = weight.to(dtype)
    k, b = layer.num_blocks, layer.block_size
    if layer.fan_in_fan_out:  # (in, out) = (k, b, out): each block of rows R_i @ W_i
        merged = torch.einsum("kij,kjo->kio", rotation, w.unflatten(0, (k, b))).flatten(0, 1)
    else:  # (out, in) = (out, k, b): each block of columns W_i @ R_i^T
        merged = torch.einsum("okj,kij->oki", w.unflatten(1, (k, b)), rotation).flatten(1)
    return merged.to(weight.dtype)


def oft_layers(model) -> list[tuple[str, AdaptedLayer]]:
    return modules.adapted_layers(model, NAME)


# --------------------------------------------------------------------------------------------------
# The method contract


def inject(model, config: Config, context: Context):
    """Freeze `model` and put a block rotation before each target layer, in place; returns `model`."""
    targets = targets_or_default(config.target_modules, modules.model_type(model), "OFT")
    model = targeting.inject_layers(
        model, config, context, NAME, "OFT", targets, lambda _, base: wrap_layer(base, config)
    )
    _note_repaired_blocks(oft_layers(model), config)
    return model


def _note_repaired_blocks(layers: list, config: Config) -> None:
    """Say where the block size (or count) asked for did not divide a layer's input and another was used."""
    if config.num_blocks is not None:
        key, asked = "num_blocks", config.num_blocks
    else:
        key, asked = "block_size", config.block_size or DEFAULT_BLOCK_SIZE
    for in_features, count, size in sorted({(x.in_features, x.num_blocks, x.block_size) for _, x in layers}):
        used = count if key == "num_blocks" else size
        if used != asked:
            log.warning(
                "OFT: %s %d does not divide a layer's %d inputs: %d used there (%d blocks of %d), "
                "as HF PEFT does",
                key, asked, in_features, used, count, size,
            )  # fmt: skip


def adapter_state(model) -> dict[str, Tensor]:
    return modules.layer_state(model, NAME)


def load_adapter_state(model, state: dict[str, Tensor]) -> None:
    modules.load_layer_state(model, NAME, state)


def merge(model):
    """Fold W' = W R^T into every base layer and unwrap; returns the plain transformers model."""
    return modules.merge_layers(model, NAME, fold, "OFT")


# --------------------------------------------------------------------------------------------------
# Counting from shapes


def count(shapes: Shapes, config: Config, saved: list[str]) -> tuple[int, int]:
    """(trainable, added): b(b-1)/2 values per block (one block with block_share)."""
    targets = targets_or_default(config.target_modules, shapes.model_type, "OFT")
    return count_layers(shapes, targets, saved, lambda _, x: trained_values(x.in_features, config))


# --------------------------------------------------------------------------------------------------
# adapter_config.json, both ways


def adapter_config(model, config: Config, task: str) -> dict:
    """The OFT fields of HF PEFT's adapter_config.json (0.21's form), enough for its from_pretrained."""
    layers = oft_layers(model)
    if not layers:
        raise modules.AdapterError("the model holds no OFT layers: nothing to describe")
    by_count = config.num_blocks is not None
    return {
        "r": config.num_blocks if by_count else 0,
        "oft_block_size": 0 if by_count else config.block_size or DEFAULT_BLOCK_SIZE,
        "use_cayley_neumann": config.use_cayley_neumann,
        "num_cayley_neumann_terms": config.num_cayley_neumann_terms,
        "block_share": config.block_share,
        "init_weights": config.init_weights,
        "module_dropout": 0.0,
        "coft": False,
        "eps": 6e-5,
        "target_modules": targeting.config_target_names(model, [name for name, _ in layers]),
        "exclude_modules": None,
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "bias": "none",
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": saved_modules(config, task)[0] or None,
        # The HF PEFT release whose OFT this is: HF PEFT warns about a Neumann series older than 0.18.
        "peft_version": HF_PEFT_FORMAT,
    }


# Fields whose non-default value changes the adapter's math or which layers it covers.
_UNSUPPORTED: dict[str, object] = {
    "coft": False,
    "bias": "none",
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
}


def config_from_adapter(fields: dict) -> Config:
    """The Config of an adapter_config.json written here or by HF PEFT 0.16 or later.

    ``module_dropout`` is training-only (and HF PEFT 0.21 does not apply it); ``eps`` only matters with coft;
    ``fan_in_fan_out`` follows the layer: all three are read and not needed.
    """
    if "oft_block_size" not in fields:
        raise UserError(
            "adapter_config.json: no oft_block_size: an OFT adapter in the format of HF PEFT 0.15 or older, "
            "which neither HF PEFT 0.21 nor peftcli loads; train it again"
        )
    refuse_unsupported(fields, _UNSUPPORTED, "OFT")
    for field in ("module_dropout", "eps"):
        number_field(fields, field, 0.0, low=-float("inf"))
    bool_field(fields, "fan_in_fan_out", False)
    count, size = int_field(fields, "r", 0, minimum=0), int_field(fields, "oft_block_size", 32, minimum=0)
    if (count == 0) == (size == 0):
        raise UserError(
            f"adapter_config.json: exactly one of r ({count}) and oft_block_size ({size}) must be non-zero"
        )
    neumann = bool_field(fields, "use_cayley_neumann", True)
    if neumann:
        _note_old_neumann(fields.get("peft_version"))
    return Config(
        block_size=size or None,
        num_blocks=count or None,
        use_cayley_neumann=neumann,
        num_cayley_neumann_terms=int_field(fields, "num_cayley_neumann_terms", 5),
        block_share=bool_field(fields, "block_share", False),
        init_weights=bool_field(fields, "init_weights", True),
        target_modules=targets_field(fields),
        modules_to_save=modules_to_save_field(fields),
    )


def _note_old_neumann(peft_version) -> None:
    """HF PEFT's Neumann series changed in 0.18: an older adapter is loaded with the current one (as HF PEFT
    loads it, with the same warning)."""
    release = re.match(r"(\d+)\.(\d+)", str(peft_version or ""))
    if release is None or (int(release[1]), int(release[2])) < (0, 18):
        log.warning(
            "adapter_config.json: an OFT adapter with use_cayley_neumann from HF PEFT %s (before 0.18, whose "
            "Neumann series differed): loaded with the current series, as HF PEFT loads it",
            peft_version or "older than 0.18",
        )
