"""What `peft compare` will train: one row per method (or per `--method NAME:key=value,...`), each an ordinary
recipe that differs from the user's only in its method, its output dir and, where the recipe sets none, its
learning rate.

A row's recipe is the user's recipe read with the user's `--set` overrides and then the row's own, so it is
checked exactly as `peft train` would check it and a fault names the flag it came from:

    --method lora:rank=0           ->  `--method lora:rank=0: method.rank: must be > 0, got 0`

The recipe's own `method:` section is the starting point of the rows of that method; a row of another method
starts from that method's defaults. Which methods apply to the model and task is asked of `peft count`'s
machinery (from the config's shapes, or on the meta device): a method that would refuse the model (BitFit
on a bias-free Llama) is listed with its reason instead of trained.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from peftcli.count import Count, count_methods
from peftcli.errors import UserError
from peftcli.methods import METHODS, config_class, default_learning_rate
from peftcli.recipe import Recipe, load_recipe

# `NAME` or `NAME:key=value,key=value`; a value is YAML, so a list may hold commas:
# rank=4,target_modules=[q, v]
_SETTING_START = re.compile(r",\s*(?=[A-Za-z_][A-Za-z0-9_]*\s*=)")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The row's training learning rate, the one setting that is not a method key.
LEARNING_RATE_KEY = "learning_rate"


@dataclass(frozen=True)
class RowSpec:
    """One `--method` flag (or a default row): the method and its settings as written."""

    method: str
    settings: tuple[tuple[str, str], ...] = ()  # (key, value as written)
    flag: str | None = None  # the flag as given, for messages; None for a default row

    @property
    def where(self) -> str:
        return self.flag or f"method {self.method}"


@dataclass
class Row:
    name: str  # its directory under the comparison's output dir
    spec: RowSpec
    recipe: Recipe
    counted: Count  # trainable and total parameters, from shapes (before anything is loaded)

    @property
    def learning_rate_source(self) -> str:
        """Where the row's learning rate came from, in words."""
        if any(key == LEARNING_RATE_KEY for key, _ in self.spec.settings):
            return "--method"
        default = default_learning_rate(self.recipe.method.name)
        return "method default" if self.recipe.train.learning_rate == default else "recipe"


@dataclass
class Plan:
    recipe: Recipe  # the user's recipe with its --set overrides
    output_dir: Path
    rows: list[Row]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (row, why it does not apply)
    # the command line it came from: recipe path, --set overrides, --method flags
    command: tuple[str, tuple[str, ...], tuple[str, ...]] = ("", (), ())

    def resume_command(self) -> str:
        """The `peft compare ... --resume` that continues this comparison."""
        recipe_path, set_overrides, method_flags = self.command
        flags = [f"--method {shlex.quote(f)}" for f in method_flags]
        flags += [f"--set {shlex.quote(s)}" for s in set_overrides]
        return " ".join(["peft compare", shlex.quote(recipe_path), *flags, "--resume"])


def parse_method_flag(text: str) -> RowSpec:
    """`lora` or `lora:rank=4,alpha=8` -> RowSpec; a UserError naming the flag for a bad one."""
    flag = f"--method {text}"
    name, colon, rest = text.partition(":")
    name = name.strip()
    try:
        config_class(name)
    except UserError as e:
        raise UserError(f"{flag}: {str(e).removeprefix('method.name: ')}") from None
    settings = []
    if colon:
        for part in _SETTING_START.split(rest):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or not _KEY.fullmatch(key):
                raise UserError(f"{flag}: expected {name}:key=value[,key=value...], got {part.strip()!r}")
            if key == "name":
                raise UserError(f"{flag}: the method is named before the colon, not with name=")
            settings.append((key, value.strip()))
        keys = [key for key, _ in settings]
        repeated = next((key for key in keys if keys.count(key) > 1), None)
        if repeated:
            raise UserError(f"{flag}: {repeated} is given twice")
    return RowSpec(name, tuple(settings), flag)


def row_name(spec: RowSpec) -> str:
    """A directory name: `lora`, `lora-rank4`, `lora-target_modules-q_proj-v_proj`."""
    parts = [spec.method] + [f"{key}{_slug(value)}" for key, value in spec.settings]
    return "-".join(parts)[:80].strip("-.")


def _slug(value: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", value).strip("-.")
    return f"-{slug}" if slug and not slug[0].isdigit() else slug


def unique_names(specs: list[RowSpec]) -> list[str]:
    """row_name of each, a suffix (`-2`, `-3`) on repeats."""
    names, seen = [], {}
    for spec in specs:
        name = row_name(spec)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def row_overrides(spec: RowSpec, recipe: Recipe, output_dir: Path) -> list[tuple[str, str]]:
    """The overrides that turn the user's recipe into the row's, each labelled with the row's flag."""
    overrides = []
    if spec.method != recipe.method.name:  # another method starts from its own defaults
        overrides.append(("method=" + json.dumps({"name": spec.method}), spec.where))
    for key, value in spec.settings:
        path = "train.learning_rate" if key == LEARNING_RATE_KEY else f"method.{key}"
        overrides.append((f"{path}={value}", spec.where))
    overrides.append(("output_dir=" + json.dumps(str(output_dir)), f"row {output_dir.name}"))
    return overrides


def make_plan(recipe_path: str | Path, set_overrides: list[str], method_flags: list[str]) -> Plan:
    """Every row's recipe, checked, and the methods that do not apply, with their reasons. Raises UserError
    for a bad recipe or flag, or when no method applies."""
    recipe = load_recipe(recipe_path, set_overrides)
    if recipe.method.from_adapter:
        raise UserError(
            "method.from_adapter: peft compare trains every method from scratch; leave from_adapter out"
        )
    output_dir = Path(recipe.output_dir)
    specs = [parse_method_flag(text) for text in method_flags] or [RowSpec(name) for name in METHODS]
    rows, skipped = [], []
    names = unique_names(specs)
    recipes = [
        load_recipe(recipe_path, [*set_overrides, *row_overrides(spec, recipe, output_dir / name)])
        for spec, name in zip(specs, names, strict=True)
    ]
    m = recipe.model
    counts = count_methods(m.source, [r.method for r in recipes], m.task, m.trust_remote_code)
    for spec, name, row_recipe, counted in zip(specs, names, recipes, counts, strict=True):
        if counted.error:
            skipped.append((name, counted.error))
        else:
            rows.append(Row(name, spec, row_recipe, counted))
    if not rows:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped)
        raise UserError(f"no method applies to {m.name} for {m.task}: {reasons}")
    command = (str(recipe_path), tuple(set_overrides), tuple(method_flags))
    return Plan(recipe, output_dir, rows, skipped, command)
