"""Adapter save/load in HF PEFT's on-disk format: adapter_model.safetensors + adapter_config.json.

Never unpickles: an adapter dir with only adapter_model.bin is refused with a clear message.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from peftcli import fileio
from peftcli.errors import UserError
from peftcli.methods import BY_PEFT_TYPE, METHODS, TASK_TYPES
from peftcli.recipe import MethodSection
from peftcli.sources import ADAPTER_CONFIG

log = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = ADAPTER_CONFIG
LABELS_NAME = "labels.json"  # classification label names, in id order (ours; HF PEFT ignores it)


def save_adapter(
    model: nn.Module,
    method: MethodSection,
    task: str,
    base_model: str,
    directory: str | Path,
    label_names: list[str] | None = None,
) -> None:
    module = METHODS[method.name]
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in module.adapter_state(model).items()}
    config = {
        "peft_type": module.PEFT_TYPE,
        "task_type": TASK_TYPES[task],
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        **module.adapter_config(model, method, task),
    }
    if config.get("prompt_tuning_init") == "TEXT" and not config.get("tokenizer_name_or_path"):
        config["tokenizer_name_or_path"] = base_model  # HF PEFT refuses a text init without one
    fileio.atomic_write(
        directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"})
    )
    fileio.write_json(directory / CONFIG_NAME, config)
    if label_names:
        fileio.write_json(directory / LABELS_NAME, label_names)


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(adapter_config, state) from an adapter dir written here or by HF PEFT."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"adapter directory not found: {directory}")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise UserError(f"{directory} holds no {CONFIG_NAME}: not an adapter directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UserError(f"{config_path}: no peft_type field: not an adapter config")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        if (directory / "adapter_model.bin").exists():
            raise UserError(
                f"{directory} holds only adapter_model.bin (a pickle, which peftcli never loads); "
                "re-save it with safetensors (HF PEFT: save_pretrained(safe_serialization=True))"
            )
        raise UserError(f"{directory} holds no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{weights}: cannot read the weights: {e}") from e
    return config, state


# Fields that say nothing about the method's math: bookkeeping, shapes derived from the base model
# (checked against it when the weights load), and HF PEFT options that only matter at their defaults.
COMMON_FIELDS = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "token_dim",
    "num_attention_heads",
    "num_layers",
    "encoder_hidden_size",
    "num_transformer_submodules",
}
HARMLESS_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16}


class _ReadTracker(dict):
    """A config dict that remembers which fields were looked at, to name the ones nobody read."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def method_from_config(config: dict, where: str = "adapter_config.json") -> MethodSection:
    """The method an adapter config describes; fields this project does not use are named in a note."""
    tracked = _ReadTracker(config)
    method = method_module(config, where).method_from_config(tracked)
    ignored = sorted(
        k
        for k in set(config) - tracked.read - COMMON_FIELDS
        if config[k] not in (None, {}, [], False) and HARMLESS_DEFAULTS.get(k, ...) != config[k]
    )
    if ignored:
        log.info("%s: ignoring fields peftcli does not use: %s", where, ", ".join(ignored))
    return method


def method_module(config: dict, where: str = "adapter_config.json"):
    peft_type = config.get("peft_type")
    if peft_type not in BY_PEFT_TYPE:
        raise UserError(
            f"{where}: peft_type {peft_type!r} is not supported here (supported: {', '.join(BY_PEFT_TYPE)})"
        )
    return BY_PEFT_TYPE[peft_type]


def task_of(config: dict) -> str:
    task_type = config.get("task_type") or "CAUSAL_LM"
    for task, name in TASK_TYPES.items():
        if name == task_type:
            return task
    raise UserError(
        f"adapter_config.json: task_type {task_type!r} is not supported "
        f"(supported: {', '.join(TASK_TYPES.values())})"
    )


def read_labels(directory: str | Path) -> list[str] | None:
    path = Path(directory) / LABELS_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def adapter_method(directory: str | Path) -> tuple[str, MethodSection, str]:
    """(base model name, method, task) of an adapter dir, from its config alone (no weights read)."""
    path = Path(directory) / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the adapter config: {e}") from e
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{path}: no base_model_name_or_path; count the base model with --method instead")
    return base, method_from_config(config, str(path)), task_of(config)


def load_adapter(model: nn.Module, directory: str | Path) -> tuple[nn.Module, MethodSection]:
    """Inject the adapter's method into `model` and load its weights; returns (model, method)."""
    config, state = read_adapter(directory)
    module = method_module(config, str(Path(directory) / CONFIG_NAME))
    method = method_from_config(config, str(Path(directory) / CONFIG_NAME))
    return apply_adapter(model, module, method, task_of(config), state), method


def apply_adapter(model: nn.Module, module, method: MethodSection, task: str, state: dict) -> nn.Module:
    """Inject `method` (of method module `module`) into `model` and load the adapter weights `state`."""
    model = module.inject(model, method, task)
    module.load_adapter_state(model, state)
    return model


# --------------------------------------------------------------------------------------------------
# Training state for --resume: optimizer tensors in safetensors, the rest in JSON (no pickle anywhere).

OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"


def save_training_state(directory: str | Path, model: nn.Module, optimizer, state: dict) -> None:
    """Everything --resume needs beyond the adapter files: every trainable parameter as it is (some
    methods save a derived form in the adapter, e.g. prefix tuning's projected prefixes), the
    optimizer's tensors, the RNG states; `state` is JSON data (step, seed, ...)."""
    import torch

    directory = Path(directory)
    opt = optimizer.state_dict()
    tensors = {
        f"state.{idx}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        for idx, slots in opt["state"].items()
        for name, v in slots.items()
    }
    tensors.update(
        {
            f"param.{name}": p.detach().cpu().contiguous()
            for name, p in model.named_parameters()
            if p.requires_grad
        }
    )
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    fileio.atomic_write(directory / OPTIMIZER_NAME, lambda tmp: save_file(tensors, tmp))
    fileio.write_json(directory / STATE_NAME, {**state, "param_groups": opt["param_groups"]})


def load_training_state(directory: str | Path, model: nn.Module, optimizer) -> dict:
    import torch

    directory = Path(directory)
    try:
        state = json.loads((directory / STATE_NAME).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / OPTIMIZER_NAME))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {directory} is incomplete or unreadable: {e}") from e
    slots: dict[int, dict] = {}
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "state":
            idx, name = rest.split(".", 1)
            slots.setdefault(int(idx), {})[name] = value
        elif kind == "param":
            if rest not in params:
                raise UserError(f"checkpoint {directory} does not fit this model: no parameter {rest}")
            with torch.no_grad():
                params[rest].copy_(value)
    optimizer.load_state_dict({"state": slots, "param_groups": state.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state
