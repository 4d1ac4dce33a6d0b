"""LoRA: a frozen linear layer plus a trainable low-rank update — Hu et al. 2021, arXiv:2106.09685.

    y = W x + b + scale * B (A (dropout(x))),    A: (r, in),  B: (out, r),  scale = alpha / r

rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) uses scale = alpha / sqrt(r). B starts at zero, so the
wrapped model equals the base model at init. State keys follow HF PEFT's files:
``base_model.model.<module path>.lora_A.weight`` and ``...lora_B.weight``.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from peftcli import frozen_linear
from peftcli.errors import UserError
from peftcli.layout import covers, default_modules_to_save, default_targets
from peftcli.methods import common
from peftcli.methods.common import KEY_PREFIX, AdapterError
from peftcli.recipe import MethodSection

PEFT_TYPE = "LORA"
MERGEABLE = True

log = logging.getLogger(__name__)


class LoRALinear(nn.Module):
    """y = base(x) + scale * B(A(dropout(x))) around a frozen ``nn.Linear`` or GPT-2 ``Conv1D``.

    A Conv1D stores its weight transposed, (in, out); the LoRA factors are plain Linears either way,
    so only the merge needs to know (``fan_in_fan_out``).
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = common.layer_shape(base)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.fan_in_fan_out = isinstance(base, Conv1D)
        # None rather than nn.Dropout(0): at p = 0 the forward skips the call and its full-size copy.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # On the base weight's device and dtype, so injecting into a meta-device model allocates nothing.
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)
        self.reset_lora_parameters(init)

    def reset_lora_parameters(self, init: str) -> None:
        """HF PEFT's choices: A ~ kaiming-uniform(a=sqrt(5)) or N(0, (1/r)^2); B = 0 (a no-op at init)."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.rank)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # Model code sometimes reads a projection's weight (e.g. its dtype); answer for the wrapped layer.
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in) -> (..., out)."""
        shape = (*x.shape[:-1], self.out_features)
        x = x.reshape(-1, self.in_features)  # (tokens, in): 2-D products, and an output that is no view
        out = self._base_forward(x)  # (tokens, out)
        lora_a, lora_b = self.lora_A.weight, self.lora_B.weight
        h = x if self.dropout is None else self.dropout(x)
        # A frozen half-precision base with fp32 factors; autocast does this cast itself when on.
        if h.dtype != lora_a.dtype and not torch.is_autocast_enabled(h.device.type):
            h = h.to(lora_a.dtype)
        down = F.linear(h, lora_a)  # (tokens, in) @ (in, r) -> (tokens, r): the only product with x
        # The in-place add needs one dtype: the base output's (bf16 under autocast, fp32 factors or not).
        down, lora_b = down.to(out.dtype), lora_b.to(out.dtype)  # no-ops when they already agree
        if out._base is not None or not out.is_contiguous():
            out = out + self.scale * F.linear(down, lora_b)
        else:
            # out += scale * down @ B^T in one fused kernel: no full-size temporary, and its backward
            # passes the gradient through uncopied. Autograd allows it because neither Linear nor
            # Conv1D saves its output for backward; on a view it would copy the gradient instead.
            out.addmm_(down, lora_b.t(), alpha=self.scale)
        return out.view(shape)

    def _base_forward(self, x: Tensor) -> Tensor:
        """The frozen layer on (tokens, in)."""
        if self.fan_in_fan_out:  # Conv1D's own forward returns a view; its math, y = b + x @ W, directly
            return torch.addmm(self.base.bias, x, self.base.weight)
        if type(self.base) is nn.Linear:
            return frozen_linear.linear(x, self.base.weight, self.base.bias)
        return self.base(x)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}"


def delta_weight(lora_A: Tensor, lora_B: Tensor, scale: float, fan_in_fan_out: bool) -> Tensor:
    """scale * B @ A, laid out like the base weight: (out, in), or (in, out) for a Conv1D.

    lora_A: (r, in), lora_B: (out, r). Computed and returned in at least float32, so a caller adds it
    to the weight in float32 and rounds once: ``(W.float() + delta).to(W.dtype)``.
    """
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    delta = (lora_B.to(dtype) @ lora_A.to(dtype)) * scale
    return delta.T if fan_in_fan_out else delta


# --------------------------------------------------------------------------------------------------
# The method contract


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def resolve_targets(model: nn.Module, method: MethodSection) -> list[str]:
    """Full names of the layers to wrap: the recipe's targets, else the architecture's usual ones."""
    targets = method.target_modules
    if targets is None:
        targets = default_targets(getattr(getattr(model, "config", None), "model_type", None))
    return common.match_targets(model, targets)


def inject(model: nn.Module, method: MethodSection, task: str) -> nn.Module:
    """Freeze `model` and wrap each target layer in a LoRALinear, in place; returns `model`."""
    if lora_layers(model):
        raise UserError("the model already holds LoRA layers: merge or reload the base model first")
    common.freeze(model)
    names = resolve_targets(model, method)
    save_names = default_modules_to_save(method.modules_to_save, task)
    # A layer inside a module trained in full (the classifier head) gets no LoRA: it trains anyway.
    inside = [name for name in names if any(covers(s, name) for s in save_names)]
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
        in_features, out_features = common.layer_shape(layer)
        if method.rank > min(in_features, out_features):
            limit = min(in_features, out_features)
            raise UserError(
                f"method.rank: {method.rank} is larger than layer `{name}` allows "
                f"(in {in_features}, out {out_features}): use a rank <= {limit}"
            )
        wrapper = LoRALinear(layer, method.rank, method.alpha, method.dropout, method.use_rslora, method.init)
        common.set_submodule(model, name, wrapper)
    common.wrap_modules_to_save(model, save_names, required=method.modules_to_save is not None)
    return model


def _factor_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every LoRA factor under its adapter-file key."""
    return {
        f"{KEY_PREFIX}{name}.{part}.weight": getattr(layer, part).weight
        for name, layer in lora_layers(model)
        for part in ("lora_A", "lora_B")
    }


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    state = {key: p.detach() for key, p in _factor_parameters(model).items()}
    state.update(common.modules_to_save_state(model))
    return state


def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    common.load_state_strict(model, _factor_parameters(model), state)


def adapter_config(model: nn.Module, method: MethodSection, task: str) -> dict:
    """The LoRA fields of HF PEFT's adapter_config.json, enough for ``PeftModel.from_pretrained``."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model holds no LoRA layers: nothing to describe")
    modules_to_save = default_modules_to_save(method.modules_to_save, task)
    alpha = int(method.alpha) if float(method.alpha).is_integer() else method.alpha
    return {
        "r": method.rank,
        "lora_alpha": alpha,
        "lora_dropout": method.dropout,
        "target_modules": _target_names(model, [name for name, _ in layers]),
        "exclude_modules": None,
        "use_rslora": method.use_rslora,
        "init_lora_weights": "gaussian" if method.init == "gaussian" else True,
        "modules_to_save": modules_to_save or None,
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


def _target_names(model: nn.Module, wrapped: list[str]) -> list[str]:
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


def method_from_config(config: dict) -> MethodSection:
    """A MethodSection from an adapter_config.json written here or by HF PEFT."""
    for field, default in _UNSUPPORTED.items():
        value = config.get(field, default)
        if value != default and (default or value):  # [] or {} for None: still the default
            raise UserError(
                f"adapter_config.json: {field} = {value!r} is not supported by peftcli's LoRA "
                f"(it changes the adapter's math or layers; supported: {default!r})"
            )
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise UserError(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise UserError(f"adapter_config.json: lora_alpha must be a positive number, got {alpha!r}")
    init = config.get("init_lora_weights", True)
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
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        targets = sorted(targets)  # HF PEFT writes a set; order never matters for matching
    modules_to_save = config.get("modules_to_save")
    return MethodSection(
        name="lora",
        rank=rank,
        alpha=float(alpha),
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        target_modules=targets,
        use_rslora=bool(config.get("use_rslora", False)),
        init=init,
        modules_to_save=list(modules_to_save) if modules_to_save is not None else None,
    )


def merge(model: nn.Module) -> nn.Module:
    """Fold W += scale * B @ A into every base layer and unwrap; returns the plain transformers model."""
    tied = _tied_parameters(model)
    layers = lora_layers(model)
    for name, layer in layers:  # all checks before the first change: never leave a half-merged model
        if id(layer.base.weight) in tied:
            raise UserError(
                f"cannot merge LoRA into `{name}`: its weight is shared with another layer "
                "(tied embeddings), which the merge would change too"
            )
    for name, layer in layers:
        weight = layer.base.weight
        delta = delta_weight(layer.lora_A.weight, layer.lora_B.weight, layer.scale, layer.fan_in_fan_out)
        with torch.no_grad():
            weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
        common.set_submodule(model, name, layer.base)
    for name, module in list(model.named_modules()):
        if isinstance(module, common.ModulesToSave):
            common.set_submodule(model, name, module.trained)
    return model


def _tied_parameters(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}
