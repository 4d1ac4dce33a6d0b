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
from peftcli.methods.layout import CLASSIFIER_HEADS, DEFAULT_TARGETS, default_targets, inside, select_targets
from peftcli.models.shapes import NotModelled

if typing.TYPE_CHECKING:
    from peftcli.models.shapes import Linear as ShapeLinear
    from peftcli.models.shapes import Shapes

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


# --------------------------------------------------------------------------------------------------
# What the methods that wrap linear layers share (LoRA's relatives: IA3, VeRA, LoHa, LoKr, OFT)


def targets_or_default(
    targets: list[str] | str | None,
    model_type: str | None,
    method: str,
    table: dict[str, list[str]] = DEFAULT_TARGETS,
) -> list[str] | str:
    """The recipe's targets, else the architecture's usual ones from `table` (LoRA's unless the method has its
    own); `method` names the method in the error for an architecture the table does not know."""
    return default_targets(model_type, table, method) if targets is None else targets


def count_layers(
    shapes: Shapes, targets: list[str] | str, saved: list[str], per_layer: Callable[[str, ShapeLinear], int]
) -> tuple[int, int]:
    """(trainable, added) of a method that wraps the linear layers `targets` picks (the output head left
    out of all-linear, layers inside `saved` modules left to them), `per_layer(name, layer)` each: what
    inject() adds, by the same rules (layout.py) on names and sizes."""
    skip = {shapes.output_head} if targets == "all-linear" and shapes.output_head else set()
    names = select_targets(list(shapes.linears), targets, skip)
    names = [n for n in names if not inside(n, saved)]
    if not names:
        raise NotModelled("inject() refuses this")
    added = sum(per_layer(name, shapes.linears[name]) for name in names)
    return added, added


def refuse_unsupported(fields: dict, unsupported: dict[str, object], method: str) -> None:
    """Refuse, by name, an adapter_config.json field whose value changes the math (or which layers the method
    covers) and is not supported here; `unsupported`: field -> the one value supported (its default)."""
    for field, default in unsupported.items():
        value = fields.get(field, default)
        if value != default and (default or value):  # [] or {} for None: still the default
            raise UserError(
                f"adapter_config.json: {field} = {value!r} is not supported by peftcli's {method} "
                f"(it changes the adapter's math or layers; supported: {default!r})"
            )


def int_field(fields: dict, field: str, default: int, minimum: int = 1) -> int:
    value = fields.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise adapter_field_error(field, f"expected an integer >= {minimum}, got {value!r}")
    return value


def number_field(
    fields: dict, field: str, default: float, low: float = 0.0, high: float | None = None
) -> float:
    """A number in [low, high) (high None: no upper bound); null reads as the default."""
    value = fields.get(field, default)
    value = default if value is None else value
    in_range = isinstance(value, (int, float)) and low <= value and (high is None or value < high)
    if isinstance(value, bool) or not in_range:
        bounds = f"[{low:g}, {high:g})" if high is not None else f">= {low:g}"
        raise adapter_field_error(field, f"expected a number {bounds}, got {value!r}")
    return float(value)


def bool_field(fields: dict, field: str, default: bool) -> bool:
    value = fields.get(field, default)
    if not isinstance(value, bool):
        raise adapter_field_error(field, f"expected true or false, got {value!r}")
    return value


def targets_field(fields: dict, field: str = "target_modules") -> list[str] | str | None:
    """target_modules as HF PEFT writes it (a list in any order, a regular expression, or null)."""
    targets = fields.get(field)
    if targets is None or isinstance(targets, str):
        return targets
    if not is_str_list(targets):
        raise adapter_field_error(
            field, f"expected a list of module names, a regular expression or null, got {targets!r}"
        )
    return sorted(targets)  # HF PEFT writes a set; order never matters for matching


def alpha_number(alpha: float) -> int | float:
    """An alpha as HF PEFT's configs hold it: an integer where it is one."""
    return int(alpha) if float(alpha).is_integer() else alpha
