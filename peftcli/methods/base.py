"""What every method's config shares, and the checks several methods run on their fields. No torch here.

A method's ``Config`` is a dataclass subclassing ``MethodConfig``: the recipe's ``method:`` section, tagged by
``name``. Its fields are the recipe keys, its defaults the single home of the method's defaults, and its
``check(fail)`` says what the types alone cannot, through ``fail(key, message)`` so that the recipe reader can
name the file, line and key at fault (``recipe.yaml:7: method.rank: must be > 0, got 0``).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

from peftcli.errors import UserError, did_you_mean
from peftcli.methods.layout import CLASSIFIER_HEADS

Fail = Callable[[str, str], NoReturn]

# What target_modules accepts, in words (LoRA's and the adapters' Config.ACCEPTS).
TARGETS_ACCEPTS = (
    "a list of module names like [q_proj, v_proj], all-linear, a regular expression, "
    "or null for the architecture's default"
)  # fail("rank", "must be > 0, got 0"): the key is relative to method.


@dataclass
class MethodConfig:
    """The fields every method has: modules trained in full, and an adapter to start from."""

    name: ClassVar[str]  # the recipe's method.name, e.g. "lora"
    # What a union-typed key accepts, in words: the bare type names would not say what a value means.
    ACCEPTS: ClassVar[dict[str, str]] = {"modules_to_save": "a list of module names, or null"}
    # Whether the default modules_to_save (the classification head) must exist; a list the recipe names
    # must always match.
    HEADS_REQUIRED: ClassVar[bool] = False
    # Keys that steer training only and are not in the adapter files (LoRA+'s ratio): a run that starts
    # from_adapter takes the adapter's config and keeps the recipe's values of these.
    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = ()

    # Modules trained in full and saved with the adapter. None: the classification head for sequence
    # classification, nothing otherwise.
    modules_to_save: list[str] | None = None
    # Start from an existing adapter of this method (ours or one saved by HF PEFT).
    from_adapter: str | None = None

    def check(self, fail: Fail) -> None:
        """Range checks the types cannot express; each subclass adds its own and calls this one."""

    def to_dict(self) -> dict[str, Any]:
        """The recipe's `method:` section: name first, the method's own keys, then the shared ones."""
        shared = [f.name for f in dataclasses.fields(MethodConfig)]
        values = dataclasses.asdict(self)
        own = {k: v for k, v in values.items() if k not in shared}
        return {"name": self.name, **own, **{k: values[k] for k in shared}}


@dataclass(frozen=True)
class Context:
    """What inject may need beyond the model and the config."""

    task: str  # causal-lm | sequence-classification
    tokenizer: object | None = None  # the model's tokenizer, where a method initialises from text
    # A resumed run's starting point, as the method's `initial_state(model)` gave it when the run began
    # (tensors by name); None: initialise afresh.
    initial: dict | None = None


def choices(config_cls: type, field: str) -> tuple[str, ...]:
    """The values a Literal field allows, e.g. ("houlsby", "pfeiffer") for the adapter's placement."""
    return typing.get_args(typing.get_type_hints(config_cls)[field])


def saved_modules(config: MethodConfig, task: str) -> tuple[list[str], bool]:
    """(modules trained in full, whether they must match something): the recipe's list, else the
    classification head for sequence classification."""
    if config.modules_to_save is not None:
        return list(config.modules_to_save), True
    default = list(CLASSIFIER_HEADS) if task == "sequence-classification" else []
    return default, type(config).HEADS_REQUIRED and bool(default)


# --------------------------------------------------------------------------------------------------
# Checks several methods share


def check_positive(config: MethodConfig, names: str, fail: Fail) -> None:
    """Each named field must be > 0 unless null."""
    for name in names.split():
        value = getattr(config, name)
        if value is not None and value <= 0:
            fail(name, f"must be > 0, got {value}")


def check_targets(targets: list[str] | str | None, fail: Fail) -> None:
    """target_modules: a non-empty list of names, all-linear, or a regular expression (and not a typo of
    all-linear, nor a comma-separated list written as one string)."""
    if isinstance(targets, list) and not all(targets or [""]):
        fail("target_modules", f"needs module names, got {targets}; leave it out for the default")
    if not isinstance(targets, str) or targets == "all-linear":
        return
    near = did_you_mean(targets, ["all-linear"])
    if near and re.fullmatch(r"[\w.\-]+", targets):
        fail("target_modules", f"{targets!r} would be read as a regular expression{near}")
    names = [p.strip() for p in targets.split(",")]
    if len(names) > 1 and all(re.fullmatch(r"[\w.]+", n) for n in names):
        listed = ", ".join(names)
        fail(
            "target_modules",
            f"{targets!r} would be read as one regular expression; for a list write [{listed}]",
        )
    try:
        re.compile(targets)
    except re.error as e:
        fail("target_modules", f"not a valid regular expression {targets!r}: {e}")


# --------------------------------------------------------------------------------------------------
# Reading adapter_config.json fields


def is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def adapter_field_error(field: str, message: str) -> UserError:
    return UserError(f"adapter_config.json: {field}: {message}")


def modules_to_save_field(fields: dict) -> list[str] | None:
    saved = fields.get("modules_to_save")
    if saved is not None and not is_str_list(saved):
        raise adapter_field_error(
            "modules_to_save", f"expected a list of module names or null, got {saved!r}"
        )
    return saved


# --------------------------------------------------------------------------------------------------
# adapter_config.json fields of HF PEFT's prompt-learning methods (prefix and prompt tuning)


def check_prompt_learning_fields(fields: dict, method: str) -> None:
    """Refuse what would change the math here: two virtual-token sets (encoder-decoder models)."""
    submodules = fields.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise UserError(
            f"adapter_config.json: num_transformer_submodules={submodules} (an encoder-decoder "
            f"{method} adapter) is not supported; only 1"
        )
    num_virtual_tokens = fields.get("num_virtual_tokens")
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0:
        raise UserError(
            f"adapter_config.json: num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}"
        )


def prompt_learning_modules_to_save(fields: dict) -> list[str] | None:
    """HF PEFT appends the classifier names once more on every load of a SEQ_CLS adapter: drop the repeats."""
    names = fields.get("modules_to_save")
    if names is None:
        return None
    unique = list(dict.fromkeys(names))
    # Our own default for sequence classification: keep the recipe's "not set" meaning.
    if fields.get("task_type") == "SEQ_CLS" and unique == CLASSIFIER_HEADS:
        return None
    return unique
