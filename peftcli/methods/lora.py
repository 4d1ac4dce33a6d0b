"""LoRA: a frozen linear layer plus a trainable low-rank update — Hu et al. 2021, arXiv:2106.09685.

    y = W x + b + scale * B (A (dropout(x))),    A: (r, in),  B: (out, r),  scale = alpha / r

rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) uses scale = alpha / sqrt(r). B starts at zero, so the
wrapped model equals the base model at init. State keys follow HF PEFT's files:
``base_model.model.<module path>.lora_A.weight`` and ``...lora_B.weight``. Merging folds
``W += scale * B @ A`` into each base layer.

DoRA (Liu et al. 2024, arXiv:2402.09353, ``use_dora``) splits the adapted weight into a magnitude and a
direction, and trains the magnitude m (out,) beside A and B:

    W' = m / ||W + scale * B A||_row  *  (W + scale * B A),    y = W' x + b

m starts at the row norms of W, so again the model is unchanged at init. The norm is treated as a constant
in backward (the paper's section 4.3): it is recomputed every forward but keeps no graph, so no (out, in)
tensor is held for backward. Saved as HF PEFT saves it: ``...lora_magnitude_vector`` beside the factors and
``use_dora: true``. (The paper writes weights as (in, out) and speaks of column norms: the same numbers.)

LoRA+ (Hayou et al. 2024, arXiv:2402.12354, ``loraplus_lr_ratio``) trains B with a learning rate `ratio`
times A's (``learning_rate_scales``); nothing changes on disk. PiSSA and OLoRA (``init: pissa | olora``)
start A and B from the base weight's SVD or QR and train on the residual weight: see lora_init.py, which
also converts such an adapter to a plain one for the original weights when it is saved.

Everything about the method is here: its recipe section (``Config``), its count from shapes (what
``peft count`` answers without torch), its adapter_config.json fields both ways, and the layer. This module
imports no torch until a layer is built (peftcli/lazy.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from peftcli.errors import UserError
from peftcli.lazy import F, LazyModule, nn, torch
from peftcli.methods import layout, lora_files, lora_init
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
quant = LazyModule("peftcli.quant.convert")
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
    ACCEPTS: ClassVar[dict[str, str]] = {
        **MethodConfig.ACCEPTS,
        "target_modules": TARGETS_ACCEPTS,
        "loraplus_lr_ratio": "a number > 0 (B's learning rate over A's), or null",
    }
    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = ("loraplus_lr_ratio",)

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # None: the architecture's usual targets; "all-linear"; a list of names / `.`-suffixes; any other
    # string is a regular expression matched against the full module name.
    target_modules: list[str] | str | None = None
    use_rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank (Kalajdzievski 2023)
    # A's init (B = 0): kaiming | gaussian; or both from the base weight: pissa | pissa_niter_<N> | olora
    init: str = "kaiming"
    use_dora: bool = False  # DoRA: a trained magnitude per output row (Liu et al. 2024)
    loraplus_lr_ratio: float | None = None  # LoRA+: B's learning rate = ratio x A's (Hayou et al. 2024)

    def check(self, fail: Fail) -> None:
        check_positive(self, "rank alpha loraplus_lr_ratio", fail)
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"must be in [0, 1), got {self.dropout}")
        check_targets(self.target_modules, fail)
        lora_init.check_init(self.init, fail)


# --------------------------------------------------------------------------------------------------
# The layer


def run(layer: AdaptedLayer, x: Tensor) -> Tensor:
    """y = base(x) + scale * B(A(dropout(x))); x: (..., in) -> (..., out).

    A frozen half-precision base may hold float32 factors: the low-rank path then runs in float32 and is
    added in the base's dtype (autocast, when on, casts by itself).
    """
    out = layer.base(x)
    h = _factor_input(layer, x)
    # (..., in) @ (in, r) @ (r, out): the rank-r path stays cheap; never x @ (A @ B).
    return out + (layer.scale * layer.lora_B(layer.lora_A(h))).to(out.dtype)


def run_dora(layer: AdaptedLayer, x: Tensor) -> Tensor:
    """DoRA: y = b + f * (W x + scale * B A x),  f = m / ||W + scale * B A||_row (detached); x: (..., in).

    Backward keeps the direction's output (tokens, out) for m's gradient, and nothing of the norm. With
    dropout active, as HF PEFT: the base keeps x and only the rescaled part sees h = dropout(x),
    y = W x + b + (f - 1) W h + f scale B A h.
    """
    h = _factor_input(layer, x)
    low_rank = layer.lora_B(layer.lora_A(h))  # (..., out)
    factor = layer.lora_magnitude_vector / weight_norm(layer)  # (out,)
    # (out, in); a quantized base dequantized for the step, as HF PEFT's DoRA does on bitsandbytes layers
    weight = layer.base.weight.T if layer.fan_in_fan_out else quant.dense_weight(layer.base)
    if layer.dropout is not None and layer.training:
        out = layer.base(x)
        rescaled = (factor - 1) * F.linear(h.to(weight.dtype), weight) + factor * layer.scale * low_rank
        return out + rescaled.to(out.dtype)
    out = F.linear(x, weight)  # W x, without the bias: the magnitude scales the direction only
    out = (factor * torch.add(out, low_rank, alpha=layer.scale)).to(out.dtype)
    bias = layer.base.bias
    return out if bias is None else out + bias.to(out.dtype)


def _factor_input(layer: AdaptedLayer, x: Tensor) -> Tensor:
    """dropout(x), in the factors' dtype (float32 factors on a half-precision base; autocast casts itself)."""
    h = x if layer.dropout is None else layer.dropout(x)
    if h.dtype != layer.lora_A.weight.dtype and not torch.is_autocast_enabled(h.device.type):
        h = h.to(layer.lora_A.weight.dtype)
    return h


def weight_norm(layer: AdaptedLayer) -> Tensor:
    """||W + scale * B A|| of each output row, (out,), in float32 and outside autograd (DoRA's constant).

    W + scale * B A is one fused product-and-add (addmm), laid out as the base stores W (a quantized base:
    its dequantized weight).
    """
    weight = quant.dense_weight(layer.base)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        lora_A, lora_B = layer.lora_A.weight.float(), layer.lora_B.weight.float()
        if layer.fan_in_fan_out:  # (in, out) + (in, r) @ (r, out)
            adapted = torch.addmm(weight.float(), lora_A.T, lora_B.T, alpha=layer.scale)
        else:  # (out, in) + (out, r) @ (r, in)
            adapted = torch.addmm(weight.float(), lora_B, lora_A, alpha=layer.scale)
        return row_norms(adapted, layer.fan_in_fan_out)


def row_norms(weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    """The norm of each output row of a weight laid out as the base stores it. An all-zero row (a pruned
    unit) gets the smallest normal float instead of 0: its magnitude starts at 0, and 0 / 0 would put NaN
    into every output (HF PEFT's does); m / tiny = 0 keeps the row at zero until training moves it."""
    norms = torch.linalg.vector_norm(weight, dim=0 if fan_in_fan_out else 1)
    return norms.clamp_min(torch.finfo(norms.dtype).tiny)


def is_dora(layer: AdaptedLayer) -> bool:
    return getattr(layer, "use_dora", False)


def wrap_layer(
    base,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
    use_dora: bool = False,
    initial: tuple[Tensor, Tensor] | None = None,
) -> AdaptedLayer:
    """A frozen ``nn.Linear`` or GPT-2 ``Conv1D`` with LoRA (or DoRA) parts beside it.

    A Conv1D stores its weight transposed, (in, out); the factors are plain Linears either way, so only the
    merge and DoRA's norm need to know (``fan_in_fan_out``). `initial`: PiSSA/OLoRA's (A0, B0) to start from
    instead of decomposing the weight (a resumed run's, see ``initial_state``).
    """
    scale = scaling(rank, alpha, use_rslora)
    layer = modules.AdaptedLayer(
        base,
        NAME,
        run_dora if use_dora else run,
        "DoRALinear" if use_dora else "LoRALinear",
        casts_input=True,
        rank=rank,
        alpha=alpha,
        scale=scale,
        init=init,
        use_dora=use_dora,
        residual_base=False,  # True once the principal part is taken out of base.weight (PiSSA, OLoRA)
    )
    # None rather than nn.Dropout(0): at p = 0 the forward skips the call and its full-size copy.
    layer.dropout = nn.Dropout(dropout) if dropout > 0 else None
    factory = modules.parameter_factory(base)  # on the meta device: shapes only
    from_base = lora_init.from_base(init)
    if from_base:  # float32 factors, as HF PEFT keeps them: the residual is computed with these values
        factory["dtype"] = torch.promote_types(factory["dtype"], torch.float32)
    layer.lora_A = nn.Linear(layer.in_features, rank, bias=False, **factory)
    layer.lora_B = nn.Linear(rank, layer.out_features, bias=False, **factory)
    if not from_base:
        reset_parameters(layer, init)
    elif factory["device"].type != "meta":
        lora_init.start_from_base(layer, initial)
    if use_dora:
        magnitude = torch.empty(layer.out_features, **modules.parameter_factory(base))
        if factory["device"].type != "meta":
            magnitude = weight_norm(layer).to(magnitude.dtype)
        layer.lora_magnitude_vector = nn.Parameter(magnitude)
    return layer


def scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """alpha / r, or rsLoRA's alpha / sqrt(r)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def reset_parameters(layer: AdaptedLayer, init: str) -> None:
    """HF PEFT's choices: A ~ kaiming-uniform(a=sqrt(5)) or N(0, (1/r)^2); B = 0 (a no-op at init)."""
    if init == "gaussian":
        nn.init.normal_(layer.lora_A.weight, std=1 / layer.rank)
    else:
        nn.init.kaiming_uniform_(layer.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B.weight)


def fold(layer: AdaptedLayer, weight: Tensor) -> Tensor:
    """The base weight with the update folded in, in float32, rounded once: W + scale * B A for LoRA,
    m / ||W + scale * B A||_row * (W + scale * B A) for DoRA (HF PEFT's merge_and_unload).

    `weight` is the layer's base weight as the adapted model uses it; a PiSSA/OLoRA adapter injected on the
    meta device (the streamed merge) has not taken the principal part out of it yet: done here.
    """
    if lora_init.from_base(layer.init) and not layer.residual_base:
        weight = lora_init.residual_of(layer, weight)
    magnitude = layer.lora_magnitude_vector if is_dora(layer) else None
    return fold_weight(
        weight, layer.lora_A.weight, layer.lora_B.weight, layer.scale, layer.fan_in_fan_out, magnitude
    )


def fold_weight(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, fan_in_fan_out: bool, magnitude=None
) -> Tensor:
    """W + scale * B A (lora_A: (r, in), lora_B: (out, r); W: (out, in), or (in, out) for a Conv1D), or with
    DoRA's `magnitude` m / ||W + scale * B A||_row * (W + scale * B A): computed in float32 (the product
    added in one pass, `addmm`), rounded once to W's dtype."""
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    left, right = (A.T, B.T) if fan_in_fan_out else (B, A)
    merged = torch.addmm(weight.to(dtype), left, right, alpha=scale)
    if magnitude is not None:
        factor = magnitude.to(dtype) / row_norms(merged, fan_in_fan_out)
        merged = merged * factor.unsqueeze(0 if fan_in_fan_out else 1)
    return merged.to(weight.dtype)


def lora_layers(model) -> list[tuple[str, AdaptedLayer]]:
    return modules.adapted_layers(model, NAME)


# --------------------------------------------------------------------------------------------------
# The method contract


def resolve_targets(model, config: Config, context: Context) -> list[str]:
    """Full names of the layers to wrap: the recipe's targets (else the architecture's usual ones), less
    those inside a module trained in full (the classifier head trains anyway)."""
    targets = config.target_modules
    if targets is None:
        targets = layout.default_targets(getattr(getattr(model, "config", None), "model_type", None))
    names = modules.match_targets(model, targets)
    save_names, _ = saved_modules(config, context.task)
    inside = [name for name in names if any(layout.covers(s, name) for s in save_names)]
    if inside:
        if len(inside) == len(names):
            raise UserError(
                f"method.target_modules: every matched layer (e.g. `{inside[0]}`) lies in "
                f"modules_to_save {save_names}, which trains in full: nothing left for LoRA"
            )
        log.warning("LoRA leaves out %s: modules_to_save trains it in full", ", ".join(inside))
    return [name for name in names if name not in inside]


def inject(model, config: Config, context: Context):
    """Freeze `model` and wrap each target layer in a LoRA layer, in place; returns `model`."""
    if lora_layers(model):
        raise UserError("the model already holds LoRA layers: merge or reload the base model first")
    modules.freeze(model)
    names = resolve_targets(model, config, context)
    tied = modules.tied_parameters(model) if lora_init.from_base(config.init) else set()
    for name in names:
        layer = model.get_submodule(name)
        in_features, out_features = modules.layer_shape(layer)
        if config.rank > min(in_features, out_features):
            raise UserError(
                f"method.rank: {config.rank} is larger than layer `{name}` allows "
                f"(in {in_features}, out {out_features}): use a rank <= {min(in_features, out_features)}"
            )
        if lora_init.from_base(config.init) and quant.is_quantized(layer):
            raise UserError(
                f"method.init: {config.init} rewrites the weight of `{name}`, which model.quantize stores "
                "quantized; use init: kaiming, or model.quantize: none"
            )
        if id(getattr(layer, "weight", None)) in tied:
            raise UserError(
                f"method.init: {config.init} rewrites the weight of `{name}`, which is shared with another "
                "layer (tied embeddings); leave it out of target_modules or use init: kaiming"
            )
        wrapper = wrap_layer(
            layer,
            config.rank,
            config.alpha,
            config.dropout,
            config.use_rslora,
            config.init,
            config.use_dora,
            initial=lora_init.initial_for(context, name) if lora_init.from_base(config.init) else None,
        )
        modules.set_submodule(model, name, wrapper)
    save_names, required = saved_modules(config, context.task)
    modules.wrap_modules_to_save(model, save_names, required=required)
    return model


def initial_state(model) -> dict[str, Tensor]:
    """PiSSA/OLoRA's initial factors by layer: what a resumed run's inject starts from (Context.initial) to
    rebuild the same residual weights exactly."""
    return lora_init.initial_state(lora_layers(model))


def learning_rate_scales(model, config: Config) -> dict[str, float]:
    """LoRA+: each trainable parameter's learning rate over the schedule's, by name (absent: 1).

    B factors get ``loraplus_lr_ratio``, and so do the 1-D parameters (DoRA's magnitudes, a trained head's
    bias), as in the paper's reference code and HF PEFT's ``create_loraplus_optimizer``.
    """
    ratio = config.loraplus_lr_ratio
    if ratio is None:
        return {}
    b_factors = {id(layer.lora_B.weight) for _, layer in lora_layers(model)}
    return {
        name: ratio
        for name, p in model.named_parameters()
        if p.requires_grad and (id(p) in b_factors or p.ndim == 1)
    }


def adapter_state(model) -> dict[str, Tensor]:
    """The adapter file's tensors; a PiSSA/OLoRA layer's as the rank-2r LoRA of the original weight."""
    return lora_init.convert_state(modules.layer_state(model, NAME), lora_layers(model))


def load_adapter_state(model, state: dict[str, Tensor]) -> None:
    modules.load_layer_state(model, NAME, state)


def merge(model):
    """Fold each layer's update into its base weight (see `fold`) and unwrap; returns the plain model."""
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
    # A: (r, in), B: (out, r); DoRA's magnitude: (out,)
    added = sum(
        config.rank * (x.in_features + x.out_features) + config.use_dora * x.out_features for x in layers
    )
    return added, added


# --------------------------------------------------------------------------------------------------
# adapter_config.json, both ways (the field mapping lives in lora_files.py)


def adapter_config(model, config: Config, task: str) -> dict:
    """The LoRA fields of HF PEFT's adapter_config.json, enough for ``PeftModel.from_pretrained``."""
    layers = lora_layers(model)
    if not layers:
        raise modules.AdapterError("the model holds no LoRA layers: nothing to describe")
    return lora_files.adapter_fields(model, config, layers, saved_modules(config, task)[0])


def config_from_adapter(fields: dict) -> Config:
    """The Config of an adapter_config.json written here or by HF PEFT."""
    return Config(**lora_files.config_fields(fields))
