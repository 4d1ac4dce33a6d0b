"""The YAML recipe: typed sections, the single home of every default, and validation.

A recipe is parsed with `yaml.SafeLoader` (tags that would build Python objects are refused),
checked key by key against the dataclasses below, and every error names the key path and,
where it can, the file and line: ``recipe.yaml:7: method.rank: must be > 0, got 0``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

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
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
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
    def __init__(self, key: str, message: str, where: str = ""):
        self.key, self.where = key, where
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{key}: {message}" if key else f"{prefix}{message}")


class _Source:
    """Where each key path came from: a file line, or a --set override."""

    def __init__(self, path: str | None):
        self.path = path
        self.lines: dict[tuple[str, ...], int] = {}
        self.overridden: set[tuple[str, ...]] = set()

    def where(self, key: tuple[str, ...]) -> str:
        for n in range(len(key), 0, -1):
            prefix = key[:n]
            if prefix in self.overridden:
                return "--set " + ".".join(prefix)
            if prefix in self.lines and self.path:
                return f"{self.path}:{self.lines[prefix]}"
        return self.path or ""

    def error(self, key: tuple[str, ...], message: str) -> RecipeError:
        return RecipeError(".".join(key), message, self.where(key))


def _record_lines(node: yaml.Node, key: tuple[str, ...], lines: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                child = (*key, str(k.value))
                lines[child] = k.start_mark.line + 1
                _record_lines(v, child, lines)


def _parse_yaml(text: str, path: str) -> tuple[Any, dict]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise RecipeError("", "the recipe is empty", path)
        data = loader.construct_document(node)
    except yaml.constructor.ConstructorError as e:
        line = f":{e.problem_mark.line + 1}" if e.problem_mark else ""
        tag = getattr(e, "problem", "") or str(e)
        raise RecipeError("", f"YAML tag refused ({tag}); a recipe holds plain values only", path + line) from e
    except yaml.MarkedYAMLError as e:
        line = f":{e.problem_mark.line + 1}" if e.problem_mark else ""
        raise RecipeError("", f"YAML syntax error: {e.problem or e.context}", path + line) from e
    except yaml.YAMLError as e:
        raise RecipeError("", f"YAML error: {e}", path) from e
    finally:
        loader.dispose()
    lines: dict = {}
    _record_lines(node, (), lines)
    return data, lines


# --------------------------------------------------------------------------------------------------
# Type checking against the dataclass hints


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any, key: tuple[str, ...], src: _Source) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        # Literal members and exact types first, so "all-linear" stays a string and 0.1 stays a float.
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, src)
            except RecipeError as e:
                errors.append(e)
        raise src.error(key, f"expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        raise src.error(key, f"expected one of {', '.join(map(str, choices))}; got {value!r}"
                        + did_you_mean(str(value), map(str, choices)))
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise src.error(key, f"expected {_type_name(hint)}, got {value!r}")
        return [_coerce(v, item, (*key, str(i)), src) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is type(None):
        if value is None:
            return None
    raise src.error(key, f"expected {_type_name(hint)}, got {value!r}")


def _build(cls: type, data: Any, key: tuple[str, ...], src: _Source) -> Any:
    if not isinstance(data, dict):
        what = "the recipe" if not key else "this section"
        raise src.error(key, f"{what} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        child = (*key, str(name))
        if name not in hints:
            raise src.error(child, "unknown key" + did_you_mean(str(name), names)
                            + f"; known keys here: {', '.join(names)}")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, child, src)
        else:
            kwargs[name] = _coerce(value, hint, child, src)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Range checks: everything the types alone cannot say


def _check(recipe: Recipe, src: _Source, base_dir: Path) -> None:
    def fail(key: str, message: str):
        raise src.error(tuple(key.split(".")), message)

    m, meth, d, t = recipe.model, recipe.method, recipe.data, recipe.train
    if not m.name:
        fail("model.name", "required: a model dir, a hub id, a .gguf file or a built-in name")
    if (m.name.endswith(".gguf") or _looks_like_path(m.name)) and not _resolve(m.name, base_dir).exists():
        fail("model.name", f"not found: {m.name}")
    if m.num_labels is not None and m.num_labels < 2:
        fail("model.num_labels", f"must be >= 2, got {m.num_labels}")
    if meth.rank <= 0:
        fail("method.rank", f"must be > 0, got {meth.rank}")
    if meth.alpha <= 0:
        fail("method.alpha", f"must be > 0, got {meth.alpha}")
    if not 0.0 <= meth.dropout < 1.0:
        fail("method.dropout", f"must be in [0, 1), got {meth.dropout}")
    if isinstance(meth.target_modules, list) and not meth.target_modules:
        fail("method.target_modules", "is an empty list; leave it out for the architecture's default")
    if meth.num_virtual_tokens <= 0:
        fail("method.num_virtual_tokens", f"must be > 0, got {meth.num_virtual_tokens}")
    if meth.encoder_hidden_size is not None and meth.encoder_hidden_size <= 0:
        fail("method.encoder_hidden_size", f"must be > 0, got {meth.encoder_hidden_size}")
    if meth.prompt_init == "text" and not meth.prompt_init_text:
        fail("method.prompt_init_text", "required when method.prompt_init is text")
    if meth.bottleneck_size is not None and meth.bottleneck_size <= 0:
        fail("method.bottleneck_size", f"must be > 0, got {meth.bottleneck_size}")
    if meth.reduction_factor <= 0:
        fail("method.reduction_factor", f"must be > 0, got {meth.reduction_factor}")
    if meth.from_adapter is not None and not _resolve(meth.from_adapter, base_dir).is_dir():
        fail("method.from_adapter", f"no adapter directory at {meth.from_adapter}")
    if not d.train:
        fail("data.train", "required: a data file, a saved dataset dir or a hub dataset name")
    if _looks_like_path(d.train) and not _resolve(d.train, base_dir).exists():
        fail("data.train", f"file not found: {d.train}")
    if isinstance(d.validation, float) and not 0.0 < d.validation < 1.0:
        fail("data.validation", f"a fraction must be in (0, 1), got {d.validation}")
    if isinstance(d.validation, str) and not _resolve(d.validation, base_dir).exists():
        fail("data.validation", f"file not found: {d.validation}")
    if d.max_length < 8:
        fail("data.max_length", f"must be >= 8, got {d.max_length}")
    if (d.format == "classification") != (m.task == "sequence-classification"):
        fail("data.format", f"format {d.format!r} does not fit model.task {m.task!r}: "
             "classification data goes with sequence-classification")
    positive = {"batch_size": t.batch_size, "gradient_accumulation": t.gradient_accumulation,
                "keep_checkpoints": t.keep_checkpoints, "log_every": t.log_every}
    for name in ("max_steps", "eval_every", "save_every", "eval_batch_size", "max_eval_batches"):
        if getattr(t, name) is not None:
            positive[name] = getattr(t, name)
    for name, value in positive.items():
        if value <= 0:
            fail(f"train.{name}", f"must be > 0, got {value}")
    if t.epochs is not None and t.epochs <= 0:
        fail("train.epochs", f"must be > 0, got {t.epochs}")
    if t.learning_rate <= 0:
        fail("train.learning_rate", f"must be > 0, got {t.learning_rate}")
    if t.weight_decay < 0:
        fail("train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        fail("train.betas", f"must be two numbers in [0, 1), got {t.betas}")
    if t.warmup_steps < 0:
        fail("train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        fail("train.max_grad_norm", f"must be > 0 or null, got {t.max_grad_norm}")
    if not recipe.output_dir:
        fail("output_dir", "must not be empty")


def _looks_like_path(value: str) -> bool:
    """A data source that is clearly a local path (a file suffix or a path separator at the start)."""
    return value.startswith((".", "/", "~")) or Path(value).suffix in {".json", ".jsonl", ".csv", ".parquet"}


def _resolve(value: str, base_dir: Path) -> Path:
    """Relative paths in a recipe are relative to the working directory, like every CLI argument."""
    return Path(value).expanduser()


# --------------------------------------------------------------------------------------------------
# Public entry points


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=10` -> (["train", "max_steps"], 10); the value is read as YAML."""
    if "=" not in text:
        raise RecipeError("", f"--set expects key.path=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise RecipeError("", f"--set expects key.path=value, got {text!r}")
    value, _ = _parse_yaml(raw, "--set " + key) if raw.strip() else (None, {})
    return parts, value


def load_recipe(path: str | Path | None, overrides: list[str] = (), data: dict | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError (exit code 2) on any fault."""
    src = _Source(str(path) if path is not None else None)
    if data is None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError("", "recipe file not found" if not p.exists() else "not a file", str(path))
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise RecipeError("", f"not UTF-8 text (bad byte at offset {e.start})", f"{path}:{line}") from e
        if not text.strip():
            raise RecipeError("", "the recipe is empty", str(path))
        data, src.lines = _parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise RecipeError("", f"the recipe must be a mapping of sections, got {type(data).__name__}",
                          str(path) if path else "")
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
        src.overridden.add(tuple(keys))
    recipe = _build(Recipe, data, (), src)
    base_dir = Path(path).parent if path else Path.cwd()
    _check(recipe, src, base_dir)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
