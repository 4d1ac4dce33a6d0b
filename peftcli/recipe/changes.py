"""What may change when a run is resumed: the recipe given now against the run's own recipe.yaml.

The model, the method and its shape, the data and every setting that shapes the updates (batch, learning
rate and schedule, seed, precision) are fixed: a checkpoint continues only the run that made it. What says
how long to train (never below the steps already trained: train/run.py checks that against the checkpoint)
or how often to evaluate, save and log may change, and so may the speed-ups (same math). A field marks
itself changeable in the schema: ``field(metadata=RESUMABLE)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

RESUMABLE = {"resumable": True}


def flatten(recipe) -> dict[str, Any]:
    """{"train.max_steps": 60, "method.rank": 8, ...}: the recipe's keys as written to recipe.yaml, but for
    output_dir (the run being resumed is there, however its path is written)."""
    flat = {}
    for section, values in recipe.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
    return flat


def _resumable(recipe) -> set[str]:
    """The keys the schema's field metadata marks changeable on resume."""
    found = set()
    for section in dataclasses.fields(recipe):
        value = getattr(recipe, section.name)
        if dataclasses.is_dataclass(value):
            found |= {
                f"{section.name}.{f.name}" for f in dataclasses.fields(value) if f.metadata.get("resumable")
            }
    return found


# Keys that name a local path: compared by the file they point to, not by how they were written.
_PATHS = ("model.name", "data.train", "data.validation", "method.from_adapter")


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in _PATHS and isinstance(old, str) and isinstance(new, str):
        a, b = Path(old).expanduser(), Path(new).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


def resume_changes(saved, new) -> tuple[list[str], dict[str, tuple[Any, Any]]]:
    """(the fixed settings that differ, as "key: old -> new" lines; the changeable ones that differ, as
    {key: (old, new)})."""
    old_flat, new_flat, kinds = flatten(saved), flatten(new), _resumable(new)
    if new.method.from_adapter and _same(
        "method.from_adapter", saved.method.from_adapter, new.method.from_adapter
    ):
        # the method is the adapter's, whatever else the section says: compare where it comes from
        old_flat = {k: v for k, v in old_flat.items() if not k.startswith("method.")}
        new_flat = {k: v for k, v in new_flat.items() if not k.startswith("method.")}
    refused, allowed = [], {}
    for key in dict.fromkeys([*old_flat, *new_flat]):
        old, value = old_flat.get(key), new_flat.get(key)
        if _same(key, old, value):
            continue
        if key in kinds:
            allowed[key] = (old, value)
        else:
            refused.append(f"{key}: {old!r} -> {value!r}")
    return refused, allowed
