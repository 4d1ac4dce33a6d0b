"""LoRA's starting points that come from the base weight: PiSSA and OLoRA, and the save-time conversion.

PiSSA (Meng et al. 2024, arXiv:2404.02948) starts the factors on the weight's principal singular
directions and trains them while the rest of the weight stays frozen:

    W = U S V^T (out, in);   B0 = U_r sqrt(S_r / s),  A0 = sqrt(S_r / s) V_r^T;   W_res = W - s B0 A0

with s the LoRA scale, so that W_res + s B0 A0 = W: the model is unchanged at init. ``pissa_niter_N`` takes
the top r singular triplets from a randomized SVD with N subspace iterations (Halko et al. 2011) instead of
the full one: fast on large layers, and seeded like everything else. OLoRA (Büyükakyüz 2024, arXiv:2406.01775)
uses the QR decomposition instead, ``W = Q R``: B0 = Q[:, :r], A0 = R[:r], W_res = W - s B0 A0 (as HF PEFT
computes it: the factors are not divided by s).

The frozen weight a trained adapter belongs to is then W_res, not W. So the adapter is saved as a plain
LoRA of rank 2r that applies to the original W (HF PEFT's ``path_initial_model_for_weight_conversion``):

    W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]

with alpha doubled too (alpha * sqrt(2) under rsLoRA), so that the scale s stays the same. This module
imports no torch until a layer is initialised (peftcli/lazy.py).
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING

from peftcli.errors import UserError, did_you_mean
from peftcli.lazy import LazyModule, torch

if TYPE_CHECKING:
    from torch import Tensor

    from peftcli.methods.base import Context, Fail
    from peftcli.methods.modules import AdaptedLayer

modules = LazyModule("peftcli.methods.modules")
log = logging.getLogger(__name__)

# method.init values; pissa_niter_<N> is pissa's randomized form
INITS = ("kaiming", "gaussian", "pissa", "olora")
_NITER = re.compile(r"pissa_niter_(\d+)")


def check_init(init: str, fail: Fail) -> None:
    if init in INITS or _NITER.fullmatch(init):
        return
    choices = f"choose from {', '.join(INITS)} or pissa_niter_<N>"
    fail("init", f"unknown value {init!r}{did_you_mean(init, INITS)}; {choices}")


def from_base(init: str) -> bool:
    """Whether `init` takes the factors from the base weight and leaves a residual base (PiSSA, OLoRA)."""
    return init in ("pissa", "olora") or bool(_NITER.fullmatch(init))


# init_lora_weights values of HF PEFT that only shape the starting point: a trained adapter loads as plain
# LoRA. (CorDA, LoftQ and LoRA-GA rewrite the base weights too, from data or by quantizing: such an adapter
# belongs with the residual base its base_model_name_or_path names.)
_START_ONLY = ("corda", "loftq", "eva", "orthogonal", "lora_ga", "mica")


def init_from_adapter(value) -> str:
    """method.init for adapter_config.json's init_lora_weights.

    pissa and olora adapters that HF PEFT saved unconverted belong to the residual of the base they name;
    HF PEFT recomputes that residual when it loads them, and so does inject. A randomized SVD's residual
    cannot be recomputed: such an adapter is refused.
    """
    if isinstance(value, bool):  # false: HF PEFT's "leave them random"; the weights come from the file
        return "kaiming"
    name = value.lower() if isinstance(value, str) else ""
    if name in ("gaussian", "pissa", "olora"):
        return name
    if _NITER.fullmatch(name):
        raise UserError(
            f"adapter_config.json: init_lora_weights = {value!r}: the adapter belongs to a base whose "
            "principal part a randomized SVD took out, which cannot be recomputed exactly; save it "
            "converted to plain LoRA (HF PEFT: save_pretrained with path_initial_model_for_weight_conversion)"
        )
    if name.startswith(_START_ONLY):
        log.info(
            "adapter_config.json: init_lora_weights = %r only sets the starting point: plain LoRA", value
        )
        return "kaiming"
    raise UserError(f"adapter_config.json: init_lora_weights = {value!r} is not a known initialisation")


def initial_factors(weight: Tensor, rank: int, scale: float, init: str) -> tuple[Tensor, Tensor]:
    """(A0: (r, in), B0: (out, r)) in float32 from `weight` laid out (out, in)."""
    weight = weight.detach().to(torch.float32)
    if init == "olora":
        q, r = torch.linalg.qr(weight)  # (out, k), (k, in)
        return r[:rank].contiguous(), q[:, :rank].contiguous()
    niter = _NITER.fullmatch(init)
    if niter:
        u, s, v = torch.svd_lowrank(weight, rank, niter=int(niter.group(1)))  # (out, r), (r,), (in, r)
        vh = v.t()
    else:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = torch.sqrt(s / scale)  # (r,): B0 A0 = U_r (S_r / s) V_r^T
    return root[:, None] * vh, u * root[None, :]


def residual(weight: Tensor, lora_A0: Tensor, lora_B0: Tensor, scale: float, fan_in_fan_out: bool) -> Tensor:
    """W - s B0 A0 in float32, rounded once to the weight's dtype; `weight` laid out as the base stores it."""
    principal = scale * (lora_B0.to(torch.float32) @ lora_A0.to(torch.float32))  # (out, in)
    if fan_in_fan_out:
        principal = principal.T
    return (weight.to(torch.float32) - principal).to(weight.dtype)


def converted_factors(
    lora_A: Tensor, lora_B: Tensor, lora_A0: Tensor, lora_B0: Tensor
) -> tuple[Tensor, Tensor]:
    """([A ; A0], [B | -B0]): the rank-2r plain LoRA that applies the trained update to the original W."""
    dtype = lora_A.dtype
    return (
        torch.cat([lora_A, lora_A0.to(dtype)], dim=0),  # (2r, in)
        torch.cat([lora_B, -lora_B0.to(dtype)], dim=1),  # (out, 2r)
    )


def converted_rank_alpha(rank: int, alpha: float, use_rslora: bool) -> tuple[int, float]:
    """Rank and alpha of the converted adapter: twice the rank, and the alpha that keeps the scale."""
    return 2 * rank, alpha * (math.sqrt(2) if use_rslora else 2)


# --------------------------------------------------------------------------------------------------
# On a LoRA layer (methods/lora.py's AdaptedLayer: rank, scale, init, lora_A, lora_B, base)


def start_from_base(layer: AdaptedLayer, initial: tuple[Tensor, Tensor] | None = None) -> None:
    """A, B = A0, B0 (from the base weight, or `initial`), and base.weight -= scale * B0 A0, in place.

    A0 and B0 stay on the layer as buffers outside the adapter state, for the conversion at save time.
    """
    weight = layer.base.weight
    lora_A0, lora_B0 = initial or base_factors(layer, weight)
    with torch.no_grad():
        modules.copy_checked(layer.lora_A.weight, lora_A0, "initial lora_A")
        modules.copy_checked(layer.lora_B.weight, lora_B0, "initial lora_B")
        layer.register_buffer("lora_A0", layer.lora_A.weight.detach().clone(), persistent=False)
        layer.register_buffer("lora_B0", layer.lora_B.weight.detach().clone(), persistent=False)
        weight.copy_(residual(weight, layer.lora_A0, layer.lora_B0, layer.scale, layer.fan_in_fan_out))
    layer.residual_base = True


def base_factors(layer: AdaptedLayer, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(A0, B0) from the base weight as the base stores it."""
    oriented = weight.T if layer.fan_in_fan_out else weight  # (out, in)
    return initial_factors(oriented, layer.rank, layer.scale, layer.init)


def residual_of(layer: AdaptedLayer, weight: Tensor) -> Tensor:
    """The residual of a stored base weight (what start_from_base leaves in base.weight)."""
    return residual(weight, *base_factors(layer, weight), layer.scale, layer.fan_in_fan_out)


def initial_state(layers: list[tuple[str, AdaptedLayer]]) -> dict[str, Tensor]:
    """Each residual layer's (A0, B0) as ``<layer>.lora_A0``, ``<layer>.lora_B0``."""
    return {
        f"{name}.{part}": getattr(layer, part)
        for name, layer in layers
        if layer.residual_base
        for part in ("lora_A0", "lora_B0")
    }


def initial_for(context: Context, name: str) -> tuple[Tensor, Tensor] | None:
    """The (A0, B0) a resumed run saved for layer `name` (Context.initial), or None: decompose afresh."""
    if context.initial is None:
        return None
    try:
        return context.initial[f"{name}.lora_A0"], context.initial[f"{name}.lora_B0"]
    except KeyError:
        raise UserError(
            f"the checkpoint holds no initial PiSSA/OLoRA factors for `{name}`: "
            "it was written by another recipe"
        ) from None


def convert_state(state: dict[str, Tensor], layers: list[tuple[str, AdaptedLayer]]) -> dict[str, Tensor]:
    """The adapter state with each residual layer's factors as the rank-2r LoRA of the original weight."""
    state = dict(state)
    for name, layer in layers:
        if layer.residual_base:
            a_key, b_key = (f"{modules.KEY_PREFIX}{name}.{part}.weight" for part in ("lora_A", "lora_B"))
            state[a_key], state[b_key] = converted_factors(
                state[a_key], state[b_key], layer.lora_A0, layer.lora_B0
            )
    return state
