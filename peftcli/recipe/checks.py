"""What the types alone cannot say about a recipe: ranges, combinations, and that its names resolve.

Each fault is reported once, at the first one found, with the key path and, where it can, the file and
line and a near miss: ``recipe.yaml:7: method.rank: must be > 0, got 0``. The model and data names are
resolved here (models/sources.py, data/sources.py), once: downstream code takes the resolved sources.
Relative paths mean relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from peftcli.data.rows import CHAT_ROLES, MESSAGE_FORMATS, format_fields
from peftcli.errors import FieldError, did_you_mean, not_found
from peftcli.recipe.parse import KeySource
from peftcli.recipe.schema import OBJECTIVES, Recipe

_POSITIVE = {  # keys that must be > 0 unless null
    "train": "batch_size gradient_accumulation keep_checkpoints log_every max_steps epochs eval_every "
    "save_every eval_batch_size max_eval_batches learning_rate".split(),
}


def check(recipe: Recipe, src: KeySource, paths: bool = True) -> None:
    """Raise the located RecipeError of the first fault. `paths=False` leaves out what depends on files
    being where they were (a recipe.yaml read back from a run dir)."""

    def fail(key: str, message: str) -> NoReturn:
        raise src.error(tuple(key.split(".")), message)

    m, method, d, t = recipe.model, recipe.method, recipe.data, recipe.train
    if not m.name:
        fail("model.name", "required: a model dir, a hub id, a .gguf file or a built-in name")
    if paths:
        _resolve(lambda: m.source, fail)
    if m.num_labels is not None and m.num_labels < 2:
        fail("model.num_labels", f"must be >= 2, got {m.num_labels}")
    if m.num_labels is not None and m.task != "sequence-classification":
        fail(
            "model.num_labels", f"applies to model.task: sequence-classification, and model.task is {m.task}"
        )

    method.check(lambda key, message: fail(f"method.{key}", message))
    if paths and method.from_adapter is not None and not Path(method.from_adapter).expanduser().is_dir():
        fail("method.from_adapter", "no adapter directory: " + not_found(method.from_adapter))

    if not d.train:
        fail("data.train", "required: a data file, a saved dataset dir or a hub dataset name")
    if paths:
        _resolve(lambda: d.train_source, fail)
    if isinstance(d.validation, float) and not 0.0 < d.validation < 1.0:
        none = "; use null for no validation" if d.validation == 0 else ""
        fail("data.validation", f"a fraction must be in (0, 1), got {d.validation}{none}")
    if paths:
        _resolve(lambda: d.validation_source, fail)
    if d.max_length < 8:
        fail("data.max_length", f"must be >= 8, got {d.max_length}")
    if (d.format == "classification") != (m.task == "sequence-classification"):
        needs = "sequence-classification" if d.format == "classification" else "causal-lm"
        fail("data.format", f"{d.format} data needs model.task: {needs}, but model.task is {m.task}")
    _check_columns(recipe, fail)
    _check_objective(recipe, fail)

    for section, names in _POSITIVE.items():
        for name in names:
            value = getattr(getattr(recipe, section), name)
            if value is not None and value <= 0:
                fail(f"{section}.{name}", f"must be > 0, got {value}")
    for name in ("weight_decay", "warmup_steps"):
        if getattr(t, name) < 0:
            fail(f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        fail("train.betas", f"must be two numbers in [0, 1) like [0.9, 0.999], got {t.betas}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        fail("train.max_grad_norm", f"must be > 0, or null for no clipping; got {t.max_grad_norm}")
    if t.gradient_checkpointing in ("up", "mlp") and not t.lean_layers:
        fail(
            "train.gradient_checkpointing",
            f"{t.gradient_checkpointing} needs train.lean_layers: true (or use true)",
        )
    if not recipe.output_dir:
        fail("output_dir", "must not be empty")
    if paths and Path(recipe.output_dir).expanduser().is_file():
        fail("output_dir", f"{recipe.output_dir} is a file; output_dir must be a directory")


def _check_columns(recipe: Recipe, fail) -> None:
    d = recipe.data
    fields = format_fields(d.format)
    for name, column in d.columns.items():
        if name not in fields:
            fail(
                f"data.columns.{name}",
                f"the {d.format} format reads no `{name}`{did_you_mean(name, fields)}; "
                f"it reads {', '.join(fields)}",
            )
        if not column:
            fail(f"data.columns.{name}", "must name a column")
    for name, role in d.roles.items():
        if d.format not in MESSAGE_FORMATS:
            fail(f"data.roles.{name}", f"the {d.format} format has no chat roles")
        if role not in CHAT_ROLES:
            fail(
                f"data.roles.{name}",
                f"maps to `{role}`{did_you_mean(role, CHAT_ROLES)}; a role is one of {', '.join(CHAT_ROLES)}",
            )


def _check_objective(recipe: Recipe, fail) -> None:
    """The objective's own ranges, and that the data and the model fit it."""
    objective, d = recipe.train.objective, recipe.data
    objective.check(lambda key, message: fail(f"train.objective.{key}", message))
    wants = objective.DATA_FORMAT
    if wants is not None and d.format != wants:
        fail(
            "train.objective",
            f"{objective.name} trains on data.format: {wants}, but data.format is {d.format}",
        )
    if wants is None and d.format in ("preference", "kto"):
        takes = [name for name, c in OBJECTIVES.items() if c.DATA_FORMAT == d.format]
        fail(
            "data.format",
            f"{d.format} data trains with train.objective {' or '.join(takes)}, not {objective.name}",
        )
    if wants is not None and d.packing:
        fail("data.packing", f"{objective.name} compares whole answers: packing does not apply")


def _resolve(source, fail) -> None:
    """Resolve a source now, so that a name that points nowhere is reported with its file and line."""
    try:
        source()
    except FieldError as e:
        fail(e.key, e.message)
