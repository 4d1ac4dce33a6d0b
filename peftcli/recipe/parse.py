"""A recipe's YAML -> typed dataclasses, with the key path and line of every fault.

The text is read with a `yaml.SafeLoader` that also reads `2e-4` as a number. Before anything is
constructed, tags that would build Python objects and duplicate keys are refused, and each key's line is
noted. Then `build` checks the data key by key against a dataclass's type hints. Every error is a
`RecipeError` that names the key path and, where it can, the file and line and a near miss:
``recipe.yaml:7: method.rank: expected an integer, got 'eight'``. What the keys mean, their defaults and
their ranges live in recipe.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal, NoReturn, Union

import yaml

from peftcli.errors import UserError, did_you_mean

# --------------------------------------------------------------------------------------------------
# Errors that know where they come from


class RecipeError(UserError):
    """A fault in a recipe or a --set override: ``where: key.path: message``, exit code 2."""

    def __init__(self, key: str, message: str, where: str = ""):
        self.key, self.where = key, where
        prefix = f"{where}: " if where else ""
        if where == f"--set {key}":  # not `--set train.max_steps: train.max_steps: ...`
            key = ""
        super().__init__(f"{prefix}{key}: {message}" if key else f"{prefix}{message}")


Key = tuple[str, ...]  # ("method", "rank"); a list item is ("train", "betas", "[0]")


def join_key(key: Key) -> str:
    return "".join(k if k.startswith("[") or i == 0 else "." + k for i, k in enumerate(key))


class KeySource:
    """Where each key path came from: a file line, or a --set override."""

    def __init__(self, path: str | None):
        self.path = path
        self.lines: dict[Key, int] = {}
        self.overridden: list[tuple[Key, str]] = []  # (key path, the flag that set it), in the order applied

    def where(self, key: Key) -> str:
        for done, flag in reversed(self.overridden):  # the last override touching this key won
            n = min(len(done), len(key))
            if done[:n] == key[:n]:
                return flag
        for n in range(len(key), 0, -1):
            if key[:n] in self.lines and self.path:
                return f"{self.path}:{self.lines[key[:n]]}"
        return self.path or ""

    def error(self, key: Key, message: str) -> RecipeError:
        return RecipeError(join_key(key), message, self.where(key))


_SHOW = reprlib.Repr()
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxlevel = 60, 60, 4, 4, 2


def show(value: Any) -> str:
    """A short repr for messages: a recursive or huge YAML value must not flood the terminal."""
    return _SHOW.repr(value)


def _suggest(word: Any, choices: Iterable[str]) -> str:
    choices = [str(c) for c in choices]
    lower = {c.lower(): c for c in choices}
    if str(word).lower() in lower:  # `LoRA`, `Rank`
        return f" (did you mean `{lower[str(word).lower()]}`?)"
    return did_you_mean(str(word), choices)


# --------------------------------------------------------------------------------------------------
# YAML: safe, with lines, and `2e-4` read as the number everyone means

# YAML 1.1 (PyYAML) wants `2.0e-4` for a float and reads `2e-4` as a string; YAML 1.2 does not.
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


for _cls in (_Loader, _Dumper):  # the dumper must know it too, so that the string "1e3" stays quoted
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))

_TAG_PREFIX = "tag:yaml.org,2002:"


def _walk(node: yaml.Node, key: Key, lines: dict[Key, int], at: Callable[[Any], str], seen: set[int]) -> None:
    """Before anything is constructed: refuse unknown tags and duplicate keys, and note each key's line."""
    if id(node) in seen:  # an alias; anchors may even be recursive
        return
    seen.add(id(node))
    if node.tag not in _Loader.yaml_constructors:
        tag = node.tag.replace(_TAG_PREFIX, "!!")
        raise RecipeError(
            join_key(key),
            f"the YAML tag `{tag}` is refused: a recipe holds plain values only",
            at(node.start_mark),
        )
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.tag == _TAG_PREFIX + "merge":  # `<<: *defaults`; its own keys may be overridden here
                _walk(v, key, {}, at, seen)
                continue
            _walk(k, key, {}, at, seen)
            child = (*key, str(k.value))
            if isinstance(k, yaml.ScalarNode) and child in lines:
                raise RecipeError(
                    join_key(child),
                    f"duplicate key (first on line {lines[child]})",
                    at(k.start_mark),
                )
            lines[child] = k.start_mark.line + 1
            _walk(v, child, lines, at, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*key, f"[{i}]")] = item.start_mark.line + 1
            _walk(item, (*key, f"[{i}]"), lines, at, seen)


def parse_yaml(text: str, where: str, with_lines: bool = True) -> tuple[Any, dict[Key, int]]:
    """(data, {key path: line}); (None, {}) for an empty document. `where` is a file or `--set key`."""

    def at(mark) -> str:
        return f"{where}:{mark.line + 1}" if with_lines and mark is not None else where

    loader = None
    try:
        loader = _Loader(text)  # reading checks the characters
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines: dict[Key, int] = {}
        _walk(node, (), lines, at, set())
        return loader.construct_document(node), lines
    except yaml.constructor.ConstructorError as e:  # unhashable keys and the like; tags were caught above
        raise RecipeError("", f"YAML error: {e.problem}", at(e.problem_mark)) from e
    except yaml.MarkedYAMLError as e:
        problem = f"{e.problem or e.context}"
        if isinstance(e, yaml.composer.ComposerError) and "another document" in problem:
            problem = "a recipe is one YAML document, but a second one starts here"
        elif e.context and e.problem:  # "while parsing a flow sequence", where the unclosed `[` is
            started = f" started on line {e.context_mark.line + 1}" if with_lines and e.context_mark else ""
            problem += f" ({e.context}{started})"
        raise RecipeError("", f"YAML syntax error: {problem}", at(e.problem_mark)) from e
    except yaml.reader.ReaderError as e:
        line = f":{text[: e.position].count(chr(10)) + 1}" if with_lines else ""
        raise RecipeError("", f"character U+{e.character:04X} is not allowed in YAML", where + line) from e
    except yaml.YAMLError as e:
        raise RecipeError("", f"YAML error: {e}", where) from e
    except RecursionError as e:
        raise RecipeError("", "YAML nested too deeply", where) from e
    finally:
        if loader is not None:
            loader.dispose()


def dump_yaml(data: Any) -> str:
    """`data` as YAML that `parse_yaml` reads back unchanged (the string "1e3" stays quoted)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Type checking against the dataclass hints

_NOUNS = {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
# Key path -> what it accepts, in words, for keys whose type names alone would not say what a value
# means (unions); every other key is described by its type.
Accepts = dict[Key, str]


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(hint)]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if origin is list:
        item = typing.get_args(hint)[0]
        return "a list of " + _PLURALS.get(item, _type_name(item))
    if origin is dict:
        return "a mapping of names to " + _PLURALS.get(typing.get_args(hint)[1], "values")
    return _NOUNS.get(hint, str(hint))


def _type_error(value: Any, hint: Any, key: Key, src: KeySource, accepts: Accepts) -> RecipeError:
    expected = accepts.get(key, _type_name(hint))
    if value is None:
        return src.error(key, f"has no value; expected {expected}")
    hint_text = ""
    if hint is str and isinstance(value, (int, float, bool, datetime.date)):
        hint_text = " (YAML read it as a non-string; put it in quotes)"
    return src.error(key, f"expected {expected}, got {show(value)}{hint_text}")


def _coerce(value: Any, hint: Any, key: Key, src: KeySource, accepts: Accepts) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        if float in args and isinstance(value, float) and not math.isfinite(value):
            raise src.error(key, f"must be a finite number, got {value}")
        # In declaration order, so "all-linear" stays a string and 0.1 stays a float.
        for arg in args:
            if isinstance(value, list) and typing.get_origin(arg) is list:
                return _coerce(value, arg, key, src, accepts)  # a list: its own error names the bad item
            try:
                return _coerce(value, arg, key, src, accepts)
            except RecipeError:
                continue
        raise _type_error(value, hint, key, src, accepts)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value is False and "no" in choices:  # YAML 1.1 reads `mixed_precision: no` as false
            return "no"
        if isinstance(value, str) and value in choices:
            return value
        if value is None:
            raise _type_error(value, hint, key, src, accepts)
        listed = ", ".join(map(str, choices))
        unknown = f"unknown value {show(value)}{_suggest(value, choices)}"
        raise src.error(key, f"{unknown}; expected one of {listed}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise _type_error(value, hint, key, src, accepts)
        return [_coerce(v, item, (*key, f"[{i}]"), src, accepts) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise _type_error(value, hint, key, src, accepts)
        for name in value:
            if not isinstance(name, str):
                raise src.error(key, f"keys must be names, got {show(name)} (put it in quotes)")
        return {name: _coerce(v, item, (*key, name), src, accepts) for name, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise src.error(key, f"must be a finite number, got {value}")
        return float(value)
    if (hint is bool and isinstance(value, bool)) or (hint is str and isinstance(value, str)):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _type_error(value, hint, key, src, accepts)


# A tagged section: a field whose declared type is a base class, built as the subclass its tag names
# (`method: {name: lora, ...}`). Declared type -> (the tag key, () -> {tag: subclass}, whether the tag's
# value alone stands for the section); the first subclass listed is the default when the tag is left out.
Tagged = dict[type, tuple[str, Callable[[], dict[str, type]], bool]]


def _yaml_keys(cls: type) -> dict[str, str]:
    """Field name -> its YAML key, for every field (a class's YAML_KEYS names the keys that differ: a
    Python keyword like `lambda` cannot be a field)."""
    renamed = {field: key for key, field in getattr(cls, "YAML_KEYS", {}).items()}
    return {f.name: renamed.get(f.name, f.name) for f in dataclasses.fields(cls)}


def build(cls: type, data: Any, src: KeySource, accepts: Accepts, tagged: Tagged, key: Key = ()) -> Any:
    """`cls(**data)` once every key is known and every value has its hinted type; nested dataclasses
    are built from nested mappings (null: all defaults). Raises RecipeError at the first fault."""
    hints = typing.get_type_hints(cls)
    fields = {yaml_key: field for field, yaml_key in _yaml_keys(cls).items()}  # YAML key -> field
    names = list(fields)
    if not isinstance(data, dict):
        _not_a_section(data, src, key, has_name="name" in names)
    kwargs = {}
    for name, value in data.items():
        child = (*key, str(name))
        if name not in fields:
            known = ", ".join(names)
            raise src.error(child, f"unknown key{_suggest(name, names)}; known keys here: {known}")
        field, hint = fields[name], hints[fields[name]]
        if hint in tagged:
            kwargs[field] = _build_tagged(
                hint, value if value is not None else {}, src, accepts, tagged, child
            )
        elif dataclasses.is_dataclass(hint):
            kwargs[field] = build(hint, value if value is not None else {}, src, accepts, tagged, child)
        else:
            kwargs[field] = _coerce(value, hint, child, src, accepts)
    return cls(**kwargs)


def _build_tagged(base: type, data: Any, src: KeySource, accepts: Accepts, tagged: Tagged, key: Key) -> Any:
    """The subclass of `base` that the section's tag names, built from the section's other keys; its own
    ACCEPTS describe its union-typed keys. Unknown keys are those the chosen subclass does not have."""
    tag, variants, name_alone = tagged[base][0], tagged[base][1](), tagged[base][2]
    if name_alone and isinstance(data, str):  # `objective: dpo`
        data = {tag: data}
    if not isinstance(data, dict):
        _not_a_section(data, src, key, has_name=tag == "name")
    choice = _coerce(data.get(tag, next(iter(variants))), Literal[tuple(variants)], (*key, tag), src, accepts)
    cls = variants[choice]
    own = {(*key, name): text for name, text in getattr(cls, "ACCEPTS", {}).items()}
    rest = {k: v for k, v in data.items() if k != tag}
    shared = [f.name for f in dataclasses.fields(base)]
    names = [tag, *(k for f, k in _yaml_keys(cls).items() if f not in shared), *shared]
    for name in rest:
        if name not in names:
            known = ", ".join(names)
            raise src.error(
                (*key, str(name)), f"unknown key{_suggest(name, names)}; known keys here: {known}"
            )
    return build(cls, rest, src, {**accepts, **own}, tagged, key)


def _not_a_section(data: Any, src: KeySource, key: Key, has_name: bool) -> NoReturn:
    if not key:
        raise src.error(key, f"the recipe must be a mapping of sections, got {type(data).__name__}")
    hint = ""
    if isinstance(data, str) and has_name:  # `method: lora`
        hint = f"; write `{join_key(key)}: {{name: {data}}}`"
    raise src.error(key, f"must be a section (a mapping of keys to values), got {show(data)}{hint}")
