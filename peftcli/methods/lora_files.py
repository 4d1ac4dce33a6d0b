"""LoRA's fields of HF PEFT's adapter_config.json, both ways (methods/lora.py's adapter_config and
config_from_adapter). No torch here.

Written: what HF PEFT writes for the same adapter, so ``PeftModel.from_pretrained`` loads ours; a PiSSA/OLoRA
adapter is written converted (lora_init.py), with the rank and alpha HF PEFT writes for a converted one. Read:
the fields peftcli's LoRA supports, and every field whose non-default value would change the math refused by
name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftcli.errors import UserError
from peftcli.methods import lora_init

if TYPE_CHECKING:
    from peftcli.methods.modules import AdaptedLayer


def adapter_fields(model, config, layers: list[tuple[str, AdaptedLayer]], modules_to_save: list[str]) -> dict:
    """The fields for `config` (lora.Config) and the model's LoRA `layers` (name, layer)."""
    rank, alpha = config.rank, config.alpha
    if any(layer.residual_base for _, layer in layers):
        rank, alpha = lora_init.converted_rank_alpha(rank, alpha, config.use_rslora)
    return {
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_names(model, [name for name, _ in layers]),
        "exclude_modules": None,
        "use_rslora": config.use_rslora,
        # a converted PiSSA/OLoRA adapter is a plain one: HF PEFT writes true for it too
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        # HF PEFT's flag for weights stored (in, out); it sets it for Conv1D layers itself as well.
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "use_dora": config.use_dora,
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


def config_fields(fields: dict) -> dict[str, Any]:
    """lora.Config's fields for an adapter_config.json written here or by HF PEFT."""
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
    init = lora_init.init_from_adapter(fields.get("init_lora_weights", True))
    use_dora = fields.get("use_dora", False)
    if not isinstance(use_dora, bool):
        raise UserError(f"adapter_config.json: use_dora must be true or false, got {use_dora!r}")
    targets = fields.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        targets = sorted(targets)  # HF PEFT writes a set; order never matters for matching
    modules_to_save = fields.get("modules_to_save")
    return dict(
        rank=rank,
        alpha=float(alpha),
        dropout=float(fields.get("lora_dropout", 0.0) or 0.0),
        target_modules=targets,
        use_rslora=bool(fields.get("use_rslora", False)),
        init=init,
        use_dora=use_dora,
        modules_to_save=list(modules_to_save) if modules_to_save is not None else None,
    )
