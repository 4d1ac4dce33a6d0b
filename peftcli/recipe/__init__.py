"""The YAML recipe: read it (parse.py), type it (schema.py), check it (checks.py), write it back.

`load_recipe` returns a `Recipe` whose model and data names are already resolved (``recipe.model.source``,
``recipe.data.train_source``) and whose learning rate is a number (the method's default where the recipe
sets none); every fault is a RecipeError naming the file, line and key. `--set
key.path=value` overrides exactly like the file.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peftcli.data.rows import format_fields
from peftcli.methods import default_learning_rate
from peftcli.recipe.checks import check
from peftcli.recipe.parse import KeySource, RecipeError, build, dump_yaml, join_key, parse_yaml, show
from peftcli.recipe.schema import (
    ACCEPTS,
    DATA_FORMATS,
    TAGGED,
    TASKS,
    DataSection,
    ModelSection,
    Recipe,
    TrainSection,
    method_configs,
)

__all__ = [
    "DATA_FORMATS",
    "TASKS",
    "DataSection",
    "ModelSection",
    "Recipe",
    "RecipeError",
    "TrainSection",
    "dump_recipe",
    "load_recipe",
    "parse_override",
    "load_run_recipe",
    "read_run_recipe",
]


def parse_override(text: str, flag: str | None = None) -> tuple[list[str], Any]:
    """`train.max_steps=10` -> (["train", "max_steps"], 10); the value is read as YAML. `flag`: the
    command-line flag the override came from, for messages (default `--set KEY`)."""
    key, eq, raw = text.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        example = "key.path=value (e.g. --set train.max_steps=10)"
        raise RecipeError("", f"{flag or '--set'} expects {example}, got {text!r}")
    value, _ = parse_yaml(raw, flag or "--set " + key.strip(), with_lines=False)
    return parts, value


# An override: `key.path=value` from --set, or (`key.path=value`, the flag it came from) from another flag
# such as `peft compare --method lora:rank=4`, which messages then name instead of --set.
Override = str | tuple[str, str]


def load_recipe(
    path: str | Path | None, overrides: Iterable[Override] = (), data: dict | None = None, paths: bool = True
) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError (exit code 2) on any fault.

    `data` is an already-parsed recipe (then `path` only names it in messages). Relative paths in the
    recipe are relative to the working directory. `paths=False` checks everything but the files the recipe
    names (a recipe read back from a run dir, whose data may have moved since). An override whose value is a
    mapping replaces that whole section (`method={name: prefix-tuning}`).
    """
    src = KeySource(str(path) if path is not None else None)
    where = src.path or ""
    if data is None:
        data, src.lines = _read(Path(path), where)
    if not isinstance(data, dict):
        raise RecipeError("", f"the recipe must be a mapping of sections, got {show(data)}", where)
    data = copy.deepcopy(data)  # overrides must not change the caller's dict
    for override in overrides:
        text, flag = (override, None) if isinstance(override, str) else override
        keys, value = parse_override(text, flag)
        flag = flag or "--set " + ".".join(keys)
        node = data
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            elif isinstance(node[k], str) and tuple(keys[: i + 1]) in NAME_ALONE:  # `objective: dpo`
                node[k] = {"name": node[k]}
            elif not isinstance(node[k], dict):
                raise RecipeError(
                    join_key(tuple(keys[: i + 1])),
                    f"is {show(node[k])}, not a section, so it has no key {keys[i + 1]!r}",
                    flag,
                )
            node = node[k]
        node[keys[-1]] = value
        src.overridden.append((tuple(keys), flag))
    _read_old_column_keys(data, src)
    recipe = build(Recipe, data, src, ACCEPTS, TAGGED)
    if recipe.train.learning_rate is None:
        recipe.train.learning_rate = default_learning_rate(recipe.method.name)
    check(recipe, src, paths=paths)
    return recipe


# Sections whose tag's value alone may stand for them (`train.objective: dpo`), so `--set` can add keys.
NAME_ALONE = {("train", "objective")}
# The data section's keys before data.columns: each named one field's column.
OLD_COLUMN_KEYS = {
    "text_column": "text",
    "instruction_column": "instruction",
    "input_column": "input",
    "output_column": "output",
    "messages_column": "messages",
    "label_column": "label",
}


def _read_old_column_keys(data: dict, src: KeySource) -> None:
    """Recipes written before data.columns name columns with `text_column: body` and the like: read each
    into data.columns (`{text: body}`), at its own line. Those the format does not read, and those naming
    the field's own default, are dropped (a run's recipe.yaml listed all six)."""
    section = data.get("data")
    if not isinstance(section, dict) or not OLD_COLUMN_KEYS.keys() & section.keys():
        return
    fields = format_fields(section.get("format", "text"))
    columns = section.get("columns")
    columns = dict(columns) if isinstance(columns, dict) else {} if columns is None else columns
    for old, name in OLD_COLUMN_KEYS.items():
        if old not in section:
            continue
        value = section.pop(old)
        if not isinstance(value, str):
            raise src.error(("data", old), f"expected a column name, got {show(value)}")
        if value == name or name not in fields or not isinstance(columns, dict):
            continue
        if columns.get(name, value) != value:
            raise src.error(
                ("data", old), f"names column `{value}`, but data.columns.{name} names `{columns[name]}`"
            )
        columns[name] = value
        if ("data", old) in src.lines:
            src.lines.setdefault(("data", "columns", name), src.lines[("data", old)])
        src.overridden[:] = [
            (("data", "columns", name) if k == ("data", old) else k, flag) for k, flag in src.overridden
        ]
    section["columns"] = columns


def _read(path: Path, where: str) -> tuple[Any, dict]:
    """(data, {key path: line}) of a recipe file; RecipeError for a file that is missing, unreadable,
    not UTF-8, or empty."""
    if not path.is_file():
        raise RecipeError("", "recipe file not found" if not path.exists() else "not a file", where)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError("", f"cannot read the recipe: {e.strerror}", where) from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        bad = f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"
        raise RecipeError("", bad, f"{where}:{line}") from e
    if not text.strip():
        raise RecipeError("", "the recipe is empty", where)
    data, lines = parse_yaml(text, where)
    if data is None:
        raise RecipeError("", "the recipe is empty (only comments)", where)
    return data, lines


def _run_recipe_data(path: Path) -> dict:
    """A run dir's recipe.yaml as data. Runs written before methods had sections of their own list every
    method's keys under `method:`; those that belong to other methods are dropped."""
    data, _ = _read(path, str(path))
    section = data.get("method") if isinstance(data, dict) else None
    if isinstance(section, dict):
        configs = method_configs()
        chosen = configs.get(section.get("name", next(iter(configs))))
        if chosen is not None:
            own = {f.name for f in dataclasses.fields(chosen)}
            foreign = {f.name for cls in configs.values() for f in dataclasses.fields(cls)} - own
            data["method"] = {k: v for k, v in section.items() if k not in foreign}
    return data


def read_run_recipe(path: str | Path) -> Recipe:
    """A run dir's recipe.yaml, as `peft train` wrote it: checked like any recipe except for the files it
    names (the data may have moved since)."""
    return load_recipe(path, data=_run_recipe_data(Path(path)), paths=False)


def load_run_recipe(run_dir: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """The recipe to continue the run in `run_dir`: its recipe.yaml (its files must be there again), with
    `overrides`; its output_dir is `run_dir` itself, wherever the run was started from."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise RecipeError("", f"{run_dir} holds no recipe.yaml: not a peft train output dir", str(run_dir))
    if any(text.strip().startswith("output_dir") for text in overrides):
        raise RecipeError("output_dir", f"is {run_dir}, the run being continued", "--set output_dir")
    recipe = load_recipe(path, overrides, data=_run_recipe_data(path))
    recipe.output_dir = str(run_dir)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default filled in; load_recipe reads it back unchanged."""
    return dump_yaml(recipe.to_dict())
