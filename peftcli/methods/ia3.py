"""(IA)^3: learned vectors that rescale activations — Liu et al. 2022, arXiv:2205.05638.

"Infused Adapter by Inhibiting and Amplifying Inner Activations" multiplies a few activations elementwise by
trained vectors: the attention keys and values, and the feed-forward block's hidden activation. Each target
layer gets one vector ``l``, starting at ones (so the model equals the base model at init):

    attention targets (keys, values):   y = (W x + b) * l,     l: (out,)   rescales the layer's output
    feed-forward targets (down_proj):   y = W (x * l) + b,     l: (in,)    rescales the layer's input

The paper's third vector scales the feed-forward hidden activation before the down projection, which is
the down projection's input: HF PEFT's ``feedforward_modules`` (a subset of the targets) mark the layers whose
*input* is scaled, and we follow it. Both forms are linear in W, so merging folds ``l`` into the weight's
rows (output) or columns (input), and an output-scaled layer's bias is scaled too.

Saved as HF PEFT saves it (``peft_type: IA3``): one tensor per layer, ``<module path>.ia3_l``, shaped
(out, 1) for an attention target and (1, in) for a feed-forward one. This module imports no torch until a
layer is built (peftcli/lazy.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from peftcli.errors import UserError
from peftcli.lazy import LazyModule, nn, torch
from peftcli.methods import layout
from peftcli.methods.base import (
    TARGETS_ACCEPTS,
    Context,
    Fail,
    MethodConfig,
    bool_field,
    check_targets,
    count_layers,
    modules_to_save_field,
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

NAME = "ia3"
PEFT_TYPE = "IA3"
MERGEABLE = True
# The learning rate a recipe gets when it sets none: (IA)3's paper (Liu et al. 2022, arXiv:2205.05638)
# trains its scaling vectors at 3e-3; a vector started at 1 moves slowly at LoRA's rates.
LEARNING_RATE = 3e-3

# The architecture's usual (IA)^3 targets (keys, values, the feed-forward output projection) and which of
# them are feed-forward layers (input scaled): the facts HF PEFT ships as its default mappings.
TARGETS: dict[str, list[str]] = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
}
FEEDFORWARD: dict[str, list[str]] = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "phi": ["fc2"],
    "gpt2": ["mlp.c_proj"],
    "gpt_bigcode": ["mlp.c_proj"],
    "gptj": ["fc_out"],
    "gpt_neo": ["c_proj"],
    "gpt_neox": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "bloom": ["mlp.dense_4h_to_h"],
    "opt": ["fc2"],
    "bart": ["fc2"],
    "t5": ["wo"],
    "mt5": [],
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "deberta-v2": ["output.dense"],
}

FEEDFORWARD_ACCEPTS = (
    "a list of name endings like [down_proj] (a subset of target_modules), a regular expression, "
    "or null for the architecture's default"
)


@dataclass
class Config(MethodConfig):
    name: ClassVar[str] = NAME
    ACCEPTS: ClassVar[dict[str, str]] = {
        **MethodConfig.ACCEPTS,
        "target_modules": TARGETS_ACCEPTS,
        "feedforward_modules": FEEDFORWARD_ACCEPTS,
    }

    # None: the architecture's keys, values and feed-forward output projection (TARGETS above).
    target_modules: list[str] | str | None = None
    # The targets whose input is scaled (None: FEEDFORWARD above). Matched as HF PEFT matches them: a target
    # layer is feed-forward when its full name ends with an entry (plain text), or fully matches a regex.
    feedforward_modules: list[str] | str | None = None

    def check(self, fail: Fail) -> None:
        check_targets(self.target_modules, fail)
        feedforward = self.feedforward_modules
        if isinstance(feedforward, str):
            try:
                re.compile(feedforward)
            except re.error as e:
                fail("feedforward_modules", f"not a valid regular expression {feedforward!r}: {e}")
        elif isinstance(feedforward, list) and isinstance(self.target_modules, list):
            extra = [name for name in feedforward if name not in self.target_modules]
            if extra:
                fail(
                    "feedforward_modules",
                    f"`{extra[0]}` is not in target_modules {self.target_modules}: the feed-forward "
                    "layers must be a subset of the targets (HF PEFT refuses the adapter otherwise)",
                )


def is_feedforward(name: str, feedforward: list[str] | str) -> bool:
    """HF PEFT's rule: the full name fully matches the regex, or ends with an entry of the list."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(entry) for entry in feedforward)


def resolved(config: Config, model_type: str | None) -> tuple[list[str] | str, list[str] | str]:
    """(targets, feed-forward modules): the recipe's, else the architecture's defaults."""
    targets = targets_or_default(config.target_modules, model_type, "IA3", TARGETS)
    feedforward = config.feedforward_modules
    if feedforward is None:
        if model_type not in FEEDFORWARD:
            raise UserError(
                f"method.feedforward_modules: no default IA3 feed-forward modules for model type "
                f"{model_type!r}; set method.feedforward_modules (the targets whose input is scaled, or [])"
            )
        feedforward = FEEDFORWARD[model_type]
    return targets, feedforward


# --------------------------------------------------------------------------------------------------
# The layer


def run(layer: AdaptedLayer, x: Tensor) -> Tensor:
    """y = base(x) * l (attention targets) or y = base(x * l) (feed-forward targets); x: (..., in).

    l is (out,) or (in,) once flattened; the product runs in l's dtype (float32 on a half-precision base) and
    is rounded to the activations' dtype.
    """
    scale = layer.ia3_l.flatten()
    if layer.is_feedforward:
        # (..., in) * (in,): each input feature of the down projection rescaled
        return layer.base((x.to(scale.dtype) * scale).to(x.dtype))
    out = layer.base(x)
    return (out * scale).to(out.dtype)  # (..., out) * (out,)


def wrap_layer(base, feedforward: bool) -> AdaptedLayer:
    """A frozen nn.Linear or GPT-2 Conv1D with its (IA)^3 vector, ones at init (the identity)."""
    layer = modules.AdaptedLayer(base, NAME, run, "IA3Linear", casts_input=True, is_feedforward=feedforward)
    shape = (1, layer.in_features) if feedforward else (layer.out_features, 1)  # HF PEFT's shapes
    layer.ia3_l = nn.Parameter(torch.ones(shape, **modules.parameter_factory(base)))
    return layer


def _scale_along(layer: AdaptedLayer, weight: Tensor) -> Tensor:
    """l shaped to broadcast over the weight: along its input axis (feed-forward) or output axis. A Linear's
    weight is (out, in), a Conv1D's (in, out)."""
    scale = layer.ia3_l.flatten().to(torch.promote_types(layer.ia3_l.dtype, torch.float32))
    input_axis = 0 if layer.fan_in_fan_out else 1
    axis = input_axis if layer.is_feedforward else 1 - input_axis
    return scale.view((-1, 1) if axis == 0 else (1, -1))


def fold(layer: AdaptedLayer, weight: Tensor) -> Tensor:
    """W with l folded in (rows for an output scale, columns for an input scale), in float32, rounded once."""
    scale = _scale_along(layer, weight)
    return (weight.to(scale.dtype) * scale).to(weight.dtype)


def fold_bias(layer: AdaptedLayer, bias: Tensor) -> Tensor:
    """b * l for an output-scaled layer ((W x + b) * l); a feed-forward layer's bias is left as it is."""
    if layer.is_feedforward:
        return bias
    scale = layer.ia3_l.flatten().to(torch.promote_types(layer.ia3_l.dtype, torch.float32))
    return (bias.to(scale.dtype) * scale).to(bias.dtype)


def ia3_layers(model) -> list[tuple[str, AdaptedLayer]]:
    return modules.adapted_layers(model, NAME)


# --------------------------------------------------------------------------------------------------
# The method contract


def inject(model, config: Config, context: Context):
    """Freeze `model` and wrap each target layer with its (IA)^3 vector, in place; returns `model`."""
    targets, feedforward = resolved(config, modules.model_type(model))

    def wrap(name, base):
        return wrap_layer(base, is_feedforward(name, feedforward))

    return targeting.inject_layers(model, config, context, NAME, "IA3", targets, wrap)


def adapter_state(model) -> dict[str, Tensor]:
    return modules.layer_state(model, NAME)


def load_adapter_state(model, state: dict[str, Tensor]) -> None:
    modules.load_layer_state(model, NAME, state)


def merge(model):
    """Fold each vector into its layer's weight (and an output-scaled layer's bias) and unwrap."""
    return modules.merge_layers(model, NAME, fold, "IA3", fold_bias)


# --------------------------------------------------------------------------------------------------
# Counting from shapes


def count(shapes: Shapes, config: Config, saved: list[str]) -> tuple[int, int]:
    """(trainable, added): one value per input feature (feed-forward targets) or output feature."""
    targets, feedforward = resolved(config, shapes.model_type)

    def per_layer(name, linear) -> int:
        return linear.in_features if is_feedforward(name, feedforward) else linear.out_features

    return count_layers(shapes, targets, saved, per_layer)


# --------------------------------------------------------------------------------------------------
# adapter_config.json, both ways


def adapter_config(model, config: Config, task: str) -> dict:
    """The IA3 fields of HF PEFT's adapter_config.json, enough for ``PeftModel.from_pretrained``."""
    layers = ia3_layers(model)
    if not layers:
        raise modules.AdapterError("the model holds no IA3 layers: nothing to describe")
    targets, feedforward = _saved_targets(model, layers)
    return {
        "target_modules": targets,
        "feedforward_modules": feedforward,
        "exclude_modules": None,
        # HF PEFT's flag for weights stored (in, out); it sets it for Conv1D layers itself as well.
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "init_ia3_weights": True,
        "modules_to_save": saved_modules(config, task)[0] or None,
    }


def _saved_targets(model, layers: list) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) that make HF PEFT wrap exactly these layers, each as it is.

    The feed-forward entries must be a subset of the target entries: the leaf names where each leaf is all
    feed-forward or all not, else the full names (HF PEFT's ends-with rule picks a full name out exactly).
    """
    wrapped = [name for name, _ in layers]
    kind = {name: layer.is_feedforward for name, layer in layers}
    targets = targeting.config_target_names(model, wrapped)
    feedforward = [t for t in targets if all(kind[n] for n in wrapped if layout.matches(n, t))]
    if any(is_feedforward(name, feedforward) != kind[name] for name in wrapped):
        targets = wrapped
        feedforward = [name for name in wrapped if kind[name]]
    return targets, feedforward


# Fields whose non-default value changes which layers the method covers.
_UNSUPPORTED: dict[str, object] = {"exclude_modules": None}


def config_from_adapter(fields: dict) -> Config:
    """The Config of an adapter_config.json written here or by HF PEFT.

    ``fan_in_fan_out`` follows the layer (HF PEFT also sets it per layer from the layer's type), and
    ``init_ia3_weights`` only shapes the starting point: both are read and not needed.
    """
    refuse_unsupported(fields, _UNSUPPORTED, "IA3")
    bool_field(fields, "fan_in_fan_out", False)
    bool_field(fields, "init_ia3_weights", True)
    return Config(
        target_modules=targets_field(fields),
        feedforward_modules=targets_field(fields, "feedforward_modules"),
        modules_to_save=modules_to_save_field(fields),
    )
