"""Adapter dirs in HF PEFT's on-disk format: adapter_model.safetensors + adapter_config.json.

`save_adapter` writes one. `AdapterDir` reads one, ours or HF PEFT's, once, for every command that takes
one (generate, predict, merge, count, training from an adapter): the config and its method, the task, the
base model, and what a `peft train` output dir holds beside them (labels.json, the tokenizer, recipe.yaml,
read through the recipe schema). Never unpickles: a dir with only adapter_model.bin is refused.
"""

from __future__ import annotations

import json
import logging
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from peftcli import fileio
from peftcli.errors import UserError
from peftcli.methods import METHODS, TASK_TYPES, Context, MethodConfig, by_peft_type
from peftcli.methods.layout import CLASSIFIER_HEADS
from peftcli.models.sources import ADAPTER_CONFIG, ModelSource, resolve

if TYPE_CHECKING:
    from torch import Tensor, nn

    from peftcli.recipe import Recipe

log = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = ADAPTER_CONFIG
LABELS_NAME = "labels.json"  # classification label names, in id order (ours; HF PEFT ignores it)
RECIPE_NAME = "recipe.yaml"  # the resolved recipe of the run that wrote the adapter
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# tokenizer_config.json's names of transformers' class for a bare tokenizer.json (one class in transformers 5)
PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def save_adapter(
    model: nn.Module,
    method: MethodConfig,
    task: str,
    base_model: str,
    directory: str | Path,
    label_names: list[str] | None = None,
) -> None:
    from safetensors.torch import save_file

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


def adapter_bytes(directory: str | Path) -> int:
    """Size on disk of the adapter files `save_adapter` wrote into `directory` (weights, config, labels)."""
    paths = (Path(directory) / name for name in (WEIGHTS_NAME, CONFIG_NAME, LABELS_NAME))
    return sum(path.stat().st_size for path in paths if path.is_file())


def load_saved_tokenizer(directory: Path):
    """transformers' tokenizer of the files a `peft train` output dir saves (chat template included), with
    a pad token (the EOS where it has none)."""
    try:
        tokenizer = _tokenizer_class(directory).from_pretrained(str(directory), trust_remote_code=False)
    except Exception as e:  # a damaged file fails in many ways (KeyError for a tokenizer.json of `{}`)
        raise UserError(f"cannot load the tokenizer saved in {directory}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_class(directory: Path):
    """The class AutoTokenizer would pick for the saved tokenizer: named directly where tokenizer_config
    names transformers' plain tokenizers-backed class (AutoTokenizer's own import takes over half a
    second), else AutoTokenizer."""
    import transformers

    try:
        config = json.loads((directory / TOKENIZER_FILES[0]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    named = config.get("tokenizer_class") if isinstance(config, dict) else None
    if named in PLAIN_TOKENIZERS and (directory / TOKENIZER_FILES[1]).is_file():
        return transformers.PreTrainedTokenizerFast
    return transformers.AutoTokenizer


class AdapterDir:
    """An adapter dir, ours or HF PEFT's, read once: each fact on first use, each fault a UserError.

    `base`: a base model to use instead of the one the config names (``--base``).
    """

    def __init__(self, directory: str | Path, base: str | None = None):
        self.path = Path(directory)
        self.base_override = base
        self.config_path = self.path / CONFIG_NAME
        if not self.path.is_dir():
            raise UserError(f"adapter directory not found: {self.path}")
        if not self.config_path.is_file():
            raise UserError(f"{self.path} holds no {CONFIG_NAME}: not an adapter directory")
        try:
            config = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.config_path}: not valid JSON ({e})") from e
        if not isinstance(config, dict) or "peft_type" not in config:
            raise UserError(f"{self.config_path}: no peft_type field: not an adapter config")
        self.config: dict = config

    # --- the adapter itself

    @cached_property
    def module(self):
        """The method module that reads this config."""
        return method_module(self.config, str(self.config_path))

    @cached_property
    def method(self) -> MethodConfig:
        return method_from_config(self.config, str(self.config_path))

    @cached_property
    def task(self) -> str:
        return task_of(self.config)

    @cached_property
    def state(self) -> dict[str, Tensor]:
        """The adapter's tensors (read on first use)."""
        from safetensors.torch import load_file

        weights = self.path / WEIGHTS_NAME
        if not weights.is_file():
            if (self.path / "adapter_model.bin").exists():
                raise UserError(
                    f"{self.path} holds only adapter_model.bin (a pickle, which peftcli never loads); "
                    "re-save it with safetensors (HF PEFT: save_pretrained(safe_serialization=True))"
                )
            raise UserError(f"{self.path} holds no {WEIGHTS_NAME}")
        try:
            return load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"{weights}: cannot read the weights: {e}") from e

    # --- its base model

    @property
    def base(self) -> str:
        """The base model: --base, else the config's base_model_name_or_path."""
        name = self.base_override or self.config.get("base_model_name_or_path")
        if not name:
            raise UserError(
                f"{self.config_path} names no base model (base_model_name_or_path is empty): "
                "pass --base MODEL"
            )
        return name

    @property
    def base_where(self) -> str:
        return "--base" if self.base_override else CONFIG_NAME

    def base_error(self, error: UserError) -> UserError:
        """A fault loading the base model, said as coming from where its name came from."""
        message = getattr(error, "message", None) or str(error).removeprefix("model.name: ")
        hint = "" if self.base_override else "; pass --base MODEL to use another copy of the base model"
        return UserError(f"base model `{self.base}` (from {self.base_where}): {message}{hint}")

    @property
    def revision(self) -> str | None:
        return self.config.get("revision") or (self.recipe.model.revision if self.recipe else None)

    @cached_property
    def base_source(self) -> ModelSource:
        """Where the base model's name points (resolved once)."""
        try:
            return resolve(self.base)
        except UserError as e:
            raise self.base_error(e) from e

    @cached_property
    def num_labels(self) -> int | None:
        """For a classifier without labels.json: the rows of the saved head's last weight matrix.

        Keys look like ``base_model.model.score.weight`` (decoders), ``...classifier.weight`` (BERT) or
        ``...classifier.out_proj.weight`` (RoBERTa, whose ``classifier.dense`` comes first).
        """
        if self.task != "sequence-classification" or self.label_names:
            return None
        best = None
        for key, tensor in sorted(self.state.items()):
            parts = key.split(".")
            if (
                parts[-1] != "weight"
                or tensor.ndim != 2
                or not any(h in parts[:-1] for h in CLASSIFIER_HEADS)
            ):
                continue
            if parts[-2] in CLASSIFIER_HEADS or parts[-2] == "out_proj":
                best = tensor.shape[0]
        return best

    def precision(self) -> tuple[str, str]:
        """(model.dtype, model.quantize) the run trained with (its recipe.yaml), else (auto, auto)."""
        if self.recipe is None:
            return "auto", "auto"
        return self.recipe.model.dtype, self.recipe.model.quantize

    def load_base(self, dtype: str | None = None, quantize: str | None = None) -> nn.Module:
        """The base model with real weights (a classifier with the adapter's labels), in eval mode; `dtype`
        and `quantize` default to the run's (`precision`), so the base is the one the adapter trained on.

        trust_remote_code is never taken from an adapter dir: a copied dir must not run code by itself."""
        from peftcli.models.load import load_model

        run_dtype, run_quantize = self.precision()
        try:
            return load_model(
                self.base_source,
                self.task,
                label_names=self.label_names,
                num_labels=self.num_labels,
                dtype=dtype or run_dtype,
                quantize=quantize or run_quantize,
                revision=self.revision,
            )
        except UserError as e:
            raise self.base_error(e) from e

    def load_model(self, dtype: str | None = None, quantize: str | None = None) -> nn.Module:
        """Base + adapter, in eval mode (`load_base` says which dtype and storage)."""
        base = self.load_base(dtype, quantize)
        return apply_adapter(base, self.module, self.method, self.task, self.state).eval()

    def load_tokenizer(self):
        """The run's tokenizer (a `peft train` output dir saves it, chat template included), else the
        base model's."""
        if self.has_tokenizer:
            return load_saved_tokenizer(self.path)
        from peftcli.models.load import load_tokenizer

        try:
            return load_tokenizer(self.base_source, revision=self.revision)
        except UserError as e:
            raise self.base_error(e) from e

    # --- what a `peft train` output dir holds beside the adapter

    @cached_property
    def label_names(self) -> list[str] | None:
        """Classification labels in id order, where the run saved them."""
        path = self.path / LABELS_NAME
        if self.task != "sequence-classification" or not path.is_file():
            return None
        try:
            names = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from e
        return names

    @property
    def has_tokenizer(self) -> bool:
        return any((self.path / name).is_file() for name in TOKENIZER_FILES)

    @cached_property
    def recipe(self) -> Recipe | None:
        """The run's recipe.yaml through the schema; None for a bare adapter dir or one that does not read
        (its data files need not exist any more: only the recipe's own checks apply)."""
        path = self.path / RECIPE_NAME
        if not path.is_file():
            return None
        from peftcli.recipe import read_run_recipe

        try:
            return read_run_recipe(path)
        except UserError as e:
            log.info("%s is not used: %s", path, e)
            return None


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


def method_from_config(config: dict, where: str = CONFIG_NAME) -> MethodConfig:
    """The method an adapter config describes; fields this project does not use are named in a note."""
    tracked = _ReadTracker(config)
    method = method_module(config, where).config_from_adapter(tracked)
    ignored = sorted(
        k
        for k in set(config) - tracked.read - COMMON_FIELDS
        if config[k] not in (None, {}, [], False) and HARMLESS_DEFAULTS.get(k, ...) != config[k]
    )
    if ignored:
        log.info("%s: ignoring fields peftcli does not use: %s", where, ", ".join(ignored))
    return method


def method_module(config: dict, where: str = CONFIG_NAME):
    module = by_peft_type(config.get("peft_type"))
    if module is None:
        supported = ", ".join(m.PEFT_TYPE for m in METHODS.values())
        raise UserError(
            f"{where}: peft_type {config.get('peft_type')!r} is not supported here (supported: {supported})"
        )
    return module


def task_of(config: dict) -> str:
    task_type = config.get("task_type") or "CAUSAL_LM"
    for task, name in TASK_TYPES.items():
        if name == task_type:
            return task
    raise UserError(
        f"adapter_config.json: task_type {task_type!r} is not supported "
        f"(supported: {', '.join(TASK_TYPES.values())})"
    )


def load_adapter(model: nn.Module, directory: str | Path) -> tuple[nn.Module, MethodConfig]:
    """Inject the adapter's method into `model` and load its weights; returns (model, method)."""
    adapter = AdapterDir(directory)
    return apply_adapter(model, adapter.module, adapter.method, adapter.task, adapter.state), adapter.method


def apply_adapter(model: nn.Module, module, method: MethodConfig, task: str, state: dict) -> nn.Module:
    """Inject `method` (of method module `module`) into `model` and load the adapter weights `state`."""
    model = module.inject(model, method, Context(task))
    module.load_adapter_state(model, state)
    return model
