"""The YAML recipe: typed sections, the single home of every default, and validation.

A recipe is parsed with a `yaml.SafeLoader` that also reads `2e-4` as a number. Before anything is
constructed, tags that would build Python objects and duplicate keys are refused. Then it is checked key
by key against the dataclasses below, `--set key.path=value` overrides exactly like the file, and every
error names the key path and, where it can, the file and line and a near miss:
``recipe.yaml:7: method.rank: must be > 0, got 0``. Relative paths mean relative to the working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import itertools
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, Union

import yaml

from peftcli.errors import UserError, did_you_mean

METHOD_NAMES = ("lora", "prefix-tuning", "prompt-tuning", "adapter", "bitfit")
TASKS = ("causal-lm", "sequence-classification")
DATA_FORMATS = ("text", "instruction", "chat", "classification")


@dataclass
class ModelSection:
    # local model dir | hub id | path/to/file.gguf | built-in name (smollm2-135m-instruct, all-minilm-l6-v2)
    name: str = ""
    task: Literal["causal-lm", "sequence-classification"] = "causal-lm"
    num_labels: int | None = None  # sequence classification: default is the number of labels in the data
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # weights' dtype when loaded
    revision: str | None = None  # hub revision
    trust_remote_code: bool = False  # run a hub model's own Python code: only when the recipe says so


@dataclass
class MethodSection:
    name: Literal["lora", "prefix-tuning", "prompt-tuning", "adapter", "bitfit"] = "lora"
    # --- LoRA (Hu et al. 2021) ---
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # None: the architecture's usual targets; "all-linear"; a list of names / `.`-suffixes; any other
    # string is a regular expression matched against the full module name.
    target_modules: list[str] | str | None = None
    use_rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank (Kalajdzievski 2023)
    init: Literal["kaiming", "gaussian"] = "kaiming"  # A's init; B starts at zero either way
    # Modules trained in full and saved with the adapter. None: the classification head for
    # sequence classification, nothing otherwise.
    modules_to_save: list[str] | None = None
    # --- prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021) ---
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # reparametrise prefixes through a 2-layer MLP
    encoder_hidden_size: int | None = None  # the MLP's hidden width; default: the model's hidden size
    prompt_init: Literal["random", "text", "vocab"] = "random"
    prompt_init_text: str | None = None  # with prompt_init: text
    # --- bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) ---
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    bottleneck_size: int | None = None  # default: hidden_size // reduction_factor
    reduction_factor: int = 16
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    # --- BitFit (Ben Zaken et al. 2021) ---
    # "all", or a list of bias groups / module name suffixes, e.g. [query, intermediate.dense]
    biases: list[str] | str = "all"
    # --- start from an existing adapter (ours or one saved by HF PEFT) ---
    from_adapter: str | None = None


@dataclass
class DataSection:
    train: str = ""  # a .json/.jsonl/.csv/.parquet file, a `save_to_disk` dir, or a hub dataset name
    format: Literal["text", "instruction", "chat", "classification"] = "text"
    validation: float | str | None = 0.1  # a fraction held out with the seed, a file, or null
    max_length: int = 512
    train_on_inputs: bool = False  # False: loss on responses only (prompt tokens get label -100)
    packing: bool = False  # concatenate short examples into full max_length rows
    split: str = "train"  # the split of a hub dataset or a DatasetDict
    text_column: str = "text"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    messages_column: str = "messages"
    label_column: str = "label"


@dataclass
class TrainSection:
    max_steps: int | None = None  # optimizer steps; wins over epochs when both are set
    epochs: float | None = None  # default: 1 epoch when neither is set
    batch_size: int = 4  # per process, per micro-step
    gradient_accumulation: int = 1
    learning_rate: float = 2.0e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # null: no clipping
    eval_every: int | None = None  # steps; null: only before and after training
    eval_batch_size: int | None = None  # default: batch_size
    max_eval_batches: int | None = None  # cap an eval pass; null: the whole validation set
    save_every: int | None = None  # steps; null: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 42
    # auto: bf16 on a GPU that has it, else fp32
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    # Cross-entropy over vocabulary chunks of rows, never holding every token's fp32 logits at once.
    chunked_loss: bool = True


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/peftcli"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _join(key: Key) -> str:
    return "".join(k if k.startswith("[") or i == 0 else "." + k for i, k in enumerate(key))


class _Source:
    """Where each key path came from: a file line, or a --set override."""

    def __init__(self, path: str | None):
        self.path = path
        self.lines: dict[Key, int] = {}
        self.overridden: list[Key] = []  # in the order applied

    def where(self, key: Key) -> str:
        for done in reversed(self.overridden):  # the last --set touching this key won
            n = min(len(done), len(key))
            if done[:n] == key[:n]:
                return "--set " + _join(done)
        for n in range(len(key), 0, -1):
            if key[:n] in self.lines and self.path:
                return f"{self.path}:{self.lines[key[:n]]}"
        return self.path or ""

    def error(self, key: Key, message: str) -> RecipeError:
        return RecipeError(_join(key), message, self.where(key))


_SHOW = reprlib.Repr()
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxlevel = 60, 60, 4, 4, 2


def _show(value: Any) -> str:
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
            _join(key),
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
                    _join(child),
                    f"duplicate key (first on line {lines[child]})",
                    at(k.start_mark),
                )
            lines[child] = k.start_mark.line + 1
            _walk(v, child, lines, at, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*key, f"[{i}]")] = item.start_mark.line + 1
            _walk(item, (*key, f"[{i}]"), lines, at, seen)


def _parse_yaml(text: str, where: str, with_lines: bool = True) -> tuple[Any, dict[Key, int]]:
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


# --------------------------------------------------------------------------------------------------
# Type checking against the dataclass hints

_NOUNS = {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}

# What a union-typed key accepts, in words; the bare type names would not say what the value means.
_ACCEPTS = {
    ("method", "target_modules"): "a list of module names like [q_proj, v_proj], all-linear, "
    "a regular expression, or null for the architecture's default",
    ("method", "biases"): "all, or a list of bias groups / module names like [query, intermediate.dense]",
    ("method", "modules_to_save"): "a list of module names, or null",
    ("data", "validation"): "a fraction like 0.1, a file path, or null for no validation",
}


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
    return _NOUNS.get(hint, str(hint))


def _type_error(value: Any, hint: Any, key: Key, src: _Source) -> RecipeError:
    expected = _ACCEPTS.get(key, _type_name(hint))
    if value is None:
        return src.error(key, f"has no value; expected {expected}")
    hint_text = ""
    if hint is str and isinstance(value, (int, float, bool, datetime.date)):
        hint_text = " (YAML read it as a non-string; put it in quotes)"
    return src.error(key, f"expected {expected}, got {_show(value)}{hint_text}")


def _coerce(value: Any, hint: Any, key: Key, src: _Source) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        # In declaration order, so "all-linear" stays a string and 0.1 stays a float.
        for arg in args:
            if isinstance(value, list) and typing.get_origin(arg) is list:
                return _coerce(value, arg, key, src)  # a list: its own error names the bad item
            try:
                return _coerce(value, arg, key, src)
            except RecipeError:
                continue
        raise _type_error(value, hint, key, src)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value is False and "no" in choices:  # YAML 1.1 reads `mixed_precision: no` as false
            return "no"
        if isinstance(value, str) and value in choices:
            return value
        if value is None:
            raise _type_error(value, hint, key, src)
        listed = ", ".join(map(str, choices))
        unknown = f"unknown value {_show(value)}{_suggest(value, choices)}"
        raise src.error(key, f"{unknown}; expected one of {listed}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise _type_error(value, hint, key, src)
        return [_coerce(v, item, (*key, f"[{i}]"), src) for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise src.error(key, f"must be a finite number, got {value}")
        return float(value)
    if (hint is bool and isinstance(value, bool)) or (hint is str and isinstance(value, str)):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _type_error(value, hint, key, src)


def _build(cls: type, data: Any, key: Key, src: _Source) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        if not key:
            raise src.error(key, f"the recipe must be a mapping of sections, got {type(data).__name__}")
        hint = ""
        if isinstance(data, str) and "name" in names:  # `method: lora`
            hint = f"; write `{_join(key)}: {{name: {data}}}`"
        raise src.error(key, f"must be a section (a mapping of keys to values), got {_show(data)}{hint}")
    kwargs = {}
    for name, value in data.items():
        child = (*key, str(name))
        if name not in hints:
            known = ", ".join(names)
            raise src.error(child, f"unknown key{_suggest(name, names)}; known keys here: {known}")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, child, src)
        else:
            kwargs[name] = _coerce(value, hint, child, src)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Range checks: everything the types alone cannot say

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_POSITIVE = {  # keys that must be > 0 unless null
    "method": "rank alpha num_virtual_tokens reduction_factor encoder_hidden_size bottleneck_size".split(),
    "train": "batch_size gradient_accumulation keep_checkpoints log_every max_steps epochs eval_every "
    "save_every eval_batch_size max_eval_batches learning_rate".split(),
}


def _check(recipe: Recipe, src: _Source) -> None:
    def fail(key: str, message: str) -> NoReturn:
        raise src.error(tuple(key.split(".")), message)

    m, meth, d, t = recipe.model, recipe.method, recipe.data, recipe.train
    if not m.name:
        fail("model.name", "required: a model dir, a hub id, a .gguf file or a built-in name")
    model_path = Path(m.name).expanduser()
    if (m.name.endswith(".gguf") or _looks_like_path(m.name)) and not model_path.exists():
        fail("model.name", _not_found(m.name))
    if model_path.is_dir() and not (model_path / "config.json").is_file():
        fail("model.name", f"{m.name} is a directory without config.json, not a transformers model")
    if m.num_labels is not None and m.num_labels < 2:
        fail("model.num_labels", f"must be >= 2, got {m.num_labels}")

    for section, names in _POSITIVE.items():
        for name in names:
            value = getattr(getattr(recipe, section), name)
            if value is not None and value <= 0:
                fail(f"{section}.{name}", f"must be > 0, got {value}")
    if not 0.0 <= meth.dropout < 1.0:
        fail("method.dropout", f"must be in [0, 1), got {meth.dropout}")
    if isinstance(meth.target_modules, list) and not all(meth.target_modules or [""]):
        fail(
            "method.target_modules",
            f"needs module names, got {meth.target_modules}; leave it out for the default",
        )
    elif isinstance(meth.target_modules, str) and meth.target_modules != "all-linear":
        _check_pattern(meth.target_modules, fail)
    if isinstance(meth.biases, str) and meth.biases != "all":
        fail(
            "method.biases",
            f"expected all or a list, got {meth.biases!r} (for one group write [{meth.biases}])",
        )
    if meth.prompt_init == "text" and not meth.prompt_init_text:
        fail("method.prompt_init_text", "required when method.prompt_init is text")
    if meth.from_adapter is not None and not Path(meth.from_adapter).expanduser().is_dir():
        fail("method.from_adapter", "no adapter directory: " + _not_found(meth.from_adapter))

    if not d.train:
        fail("data.train", "required: a data file, a saved dataset dir or a hub dataset name")
    if _looks_like_path(d.train):
        _check_data_file(d.train, "data.train", fail)
    if isinstance(d.validation, float) and not 0.0 < d.validation < 1.0:
        none = "; use null for no validation" if d.validation == 0 else ""
        fail("data.validation", f"a fraction must be in (0, 1), got {d.validation}{none}")
    if isinstance(d.validation, str):
        _check_data_file(d.validation, "data.validation", fail)
    if d.max_length < 8:
        fail("data.max_length", f"must be >= 8, got {d.max_length}")
    if (d.format == "classification") != (m.task == "sequence-classification"):
        needs = "sequence-classification" if d.format == "classification" else "causal-lm"
        fail("data.format", f"{d.format} data needs model.task: {needs}, but model.task is {m.task}")

    for name in ("weight_decay", "warmup_steps"):
        if getattr(t, name) < 0:
            fail(f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        fail("train.betas", f"must be two numbers in [0, 1) like [0.9, 0.999], got {t.betas}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        fail("train.max_grad_norm", f"must be > 0, or null for no clipping; got {t.max_grad_norm}")
    if not recipe.output_dir:
        fail("output_dir", "must not be empty")
    if Path(recipe.output_dir).expanduser().is_file():
        fail("output_dir", f"{recipe.output_dir} is a file; output_dir must be a directory")


def _check_pattern(pattern: str, fail: Callable[[str, str], NoReturn]) -> None:
    """A string target is a regular expression; catch the two ways people mean something else."""
    key = "method.target_modules"
    near = did_you_mean(pattern, ["all-linear"])
    if near and re.fullmatch(r"[\w.\-]+", pattern):
        fail(key, f"{pattern!r} would be read as a regular expression{near}")
    names = [p.strip() for p in pattern.split(",")]
    if len(names) > 1 and all(re.fullmatch(r"[\w.]+", n) for n in names):
        listed = ", ".join(names)
        fail(key, f"{pattern!r} would be read as one regular expression; for a list write [{listed}]")
    try:
        re.compile(pattern)
    except re.error as e:
        fail(key, f"not a valid regular expression {pattern!r}: {e}")


def _check_data_file(value: str, key: str, fail: Callable[[str, str], NoReturn]) -> None:
    path = Path(value).expanduser()
    if not path.exists():
        hint = ""
        if _FRACTION.fullmatch(value.strip()):
            hint = f"; for a fraction write a number without quotes: {value.strip()}"
        fail(key, _not_found(value) + hint)
    if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
        kinds = ", ".join(DATA_SUFFIXES)
        fail(
            key,
            f"unsupported file type {path.suffix or '(none)'}: {value}; use {kinds} or a `save_to_disk` dir",
        )


_FRACTION = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _looks_like_path(value: str) -> bool:
    """A source that is clearly a local path (a file suffix or a path separator at the start)."""
    return value.startswith((".", "/", "~")) or Path(value).suffix.lower() in DATA_SUFFIXES


def _not_found(value: str) -> str:
    """`not found: data/trian.jsonl (did you mean `data/train.jsonl`?)`. Relative paths are relative to
    the working directory, like every command-line argument."""
    path = Path(value).expanduser()
    message = f"not found: {value}"
    if path.parent.is_dir():
        siblings = [p.name for p in itertools.islice(path.parent.iterdir(), 2000)]
        close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
        if close:
            message += f" (did you mean `{value[: len(value) - len(path.name)]}{close[0]}`?)"
    if not path.is_absolute():
        message += f"; relative paths are read from the working directory {Path.cwd()}"
    return message


# --------------------------------------------------------------------------------------------------
# Public entry points


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=10` -> (["train", "max_steps"], 10); the value is read as YAML."""
    key, eq, raw = text.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        raise RecipeError("", f"--set expects key.path=value (e.g. --set train.max_steps=10), got {text!r}")
    value, _ = _parse_yaml(raw, "--set " + key.strip(), with_lines=False)
    return parts, value


def load_recipe(path: str | Path | None, overrides: Iterable[str] = (), data: dict | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError (exit code 2) on any fault.

    `data` is an already-parsed recipe (then `path` only names it in messages). Relative paths in the
    recipe are relative to the working directory.
    """
    src = _Source(str(path) if path is not None else None)
    where = src.path or ""
    if data is None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError("", "recipe file not found" if not p.exists() else "not a file", where)
        try:
            raw = p.read_bytes()
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
        data, src.lines = _parse_yaml(text, where)
        if data is None:
            raise RecipeError("", "the recipe is empty (only comments)", where)
    if not isinstance(data, dict):
        raise RecipeError("", f"the recipe must be a mapping of sections, got {_show(data)}", where)
    data = copy.deepcopy(data)  # overrides must not change the caller's dict
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            elif not isinstance(node[k], dict):
                raise RecipeError(
                    _join(tuple(keys[: i + 1])),
                    f"is {_show(node[k])}, not a section, so it has no key {keys[i + 1]!r}",
                    "--set " + ".".join(keys),
                )
            node = node[k]
        node[keys[-1]] = value
        src.overridden.append(tuple(keys))
    recipe = _build(Recipe, data, (), src)
    _check(recipe, src)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default filled in; load_recipe reads it back unchanged."""
    return yaml.dump(recipe.to_dict(), Dumper=_Dumper, sort_keys=False)
