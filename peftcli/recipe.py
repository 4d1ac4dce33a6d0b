"""The YAML recipe: typed sections, the single home of every default, and validation.

A recipe is read by recipe_yaml.py: safely, with each key's line, and checked key by key against the
dataclasses below. The range checks here say what the types alone cannot; `--set key.path=value`
overrides exactly like the file, and every error names the key path and, where it can, the file and line
and a near miss: ``recipe.yaml:7: method.rank: must be > 0, got 0``. Relative paths mean relative to the
working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import re
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

from peftcli.errors import did_you_mean
from peftcli.recipe_yaml import Accepts, KeySource, RecipeError, build, dump_yaml, join_key, parse_yaml, show

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


def method_choices(field_name: str) -> tuple[str, ...]:
    """The values a Literal field of MethodSection allows, e.g. ("houlsby", "pfeiffer") for placement."""
    return typing.get_args(typing.get_type_hints(MethodSection)[field_name])


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
    # Recompute activations in backward instead of keeping them. true: every layer (least memory);
    # mlp: the SwiGLU MLPs' gate and up projections; up: up's only (mlp and up need lean_layers and a
    # Llama-family model); auto: up where that applies, else nothing; false: nothing (fastest)
    gradient_checkpointing: bool | Literal["auto", "up", "mlp"] = "auto"
    # Cross-entropy over vocabulary chunks of rows, never holding every token's fp32 logits at once.
    chunked_loss: bool = True
    # Llama-family SwiGLU MLPs and RMSNorms keep less for backward and recompute the rest (same math).
    lean_layers: bool = True


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/peftcli"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# What a union-typed key accepts, in words; the bare type names would not say what the value means.
_ACCEPTS: Accepts = {
    ("method", "target_modules"): "a list of module names like [q_proj, v_proj], all-linear, "
    "a regular expression, or null for the architecture's default",
    ("method", "biases"): "all, or a list of bias groups / module names like [query, intermediate.dense]",
    ("method", "modules_to_save"): "a list of module names, or null",
    ("data", "validation"): "a fraction like 0.1, a file path, or null for no validation",
    ("train", "gradient_checkpointing"): "auto, true, false, up or mlp",
}


# --------------------------------------------------------------------------------------------------
# Range checks: everything the types alone cannot say

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_POSITIVE = {  # keys that must be > 0 unless null
    "method": "rank alpha num_virtual_tokens reduction_factor encoder_hidden_size bottleneck_size".split(),
    "train": "batch_size gradient_accumulation keep_checkpoints log_every max_steps epochs eval_every "
    "save_every eval_batch_size max_eval_batches learning_rate".split(),
}


def _check(recipe: Recipe, src: KeySource) -> None:
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
    if t.gradient_checkpointing in ("up", "mlp") and not t.lean_layers:
        fail(
            "train.gradient_checkpointing",
            f"{t.gradient_checkpointing} needs train.lean_layers: true (or use true)",
        )
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
    value, _ = parse_yaml(raw, "--set " + key.strip(), with_lines=False)
    return parts, value


def load_recipe(path: str | Path | None, overrides: Iterable[str] = (), data: dict | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError (exit code 2) on any fault.

    `data` is an already-parsed recipe (then `path` only names it in messages). Relative paths in the
    recipe are relative to the working directory.
    """
    src = KeySource(str(path) if path is not None else None)
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
        data, src.lines = parse_yaml(text, where)
        if data is None:
            raise RecipeError("", "the recipe is empty (only comments)", where)
    if not isinstance(data, dict):
        raise RecipeError("", f"the recipe must be a mapping of sections, got {show(data)}", where)
    data = copy.deepcopy(data)  # overrides must not change the caller's dict
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            elif not isinstance(node[k], dict):
                raise RecipeError(
                    join_key(tuple(keys[: i + 1])),
                    f"is {show(node[k])}, not a section, so it has no key {keys[i + 1]!r}",
                    "--set " + ".".join(keys),
                )
            node = node[k]
        node[keys[-1]] = value
        src.overridden.append(tuple(keys))
    recipe = build(Recipe, data, src, _ACCEPTS)
    _check(recipe, src)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default filled in; load_recipe reads it back unchanged."""
    return dump_yaml(recipe.to_dict())
