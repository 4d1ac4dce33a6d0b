"""`peft count`: trainable vs total parameters of methods, without weights or downloads.

From the config's shapes alone where models/shapes.py models the architecture (no torch import: well under
a second), each method's own `count`; else by injecting each method into the model built on the meta device.
Both follow HF PEFT's convention: total = base + adapter parameters, each shared tensor once; tests hold the
two equal.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from peftcli import memory
from peftcli.errors import UserError
from peftcli.methods import METHODS, TASK_TYPES, Context, MethodConfig, config_class, layout
from peftcli.methods.base import saved_modules
from peftcli.models.precision import Precision
from peftcli.models.precision import resolve as resolve_precision
from peftcli.models.shapes import Linear, NotModelled, Shapes, config_shapes
from peftcli.models.sources import ADAPTER_CONFIG, ModelSource, resolve
from peftcli.quant.formats import DTYPE_BYTES, QUANTIZE_CHOICES


@dataclasses.dataclass
class Count:
    method: str
    trainable: int
    total: int
    error: str | None = None  # why the method does not apply to this model (then the counts are 0)
    frozen_bytes: int | None = None  # the frozen base as `precision` loads it (memory.py); None: not asked
    trained_bytes: int | None = None  # the trainable parameters with their gradients and AdamW state

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        if self.error:
            return {"method": self.method, "error": self.error}
        counted = {
            "method": self.method,
            "trainable": self.trainable,
            "total": self.total,
            "trainable_percent": round(self.trainable_percent, 6),
        }
        if self.frozen_bytes is not None:
            counted["memory"] = {
                "frozen_bytes": self.frozen_bytes,
                "trained_bytes": self.trained_bytes,
                "total_bytes": self.frozen_bytes + self.trained_bytes,
            }
        return counted


def count_methods(
    model: ModelSource | str,
    methods: list[MethodConfig],
    task: str | None = None,
    trust_remote_code: bool = False,
    precision: Precision | None = None,
) -> list[Count]:
    """One Count per method: from the config's shapes where they are modelled, else on the meta model. A
    method that does not apply to the model gets a Count with its reason. With `precision`, each Count
    holds the memory of a run too (memory.py)."""
    source = resolve(model) if isinstance(model, str) else model
    shapes = config_shapes(source, task, trust_remote_code)
    counts: dict[int, Count] = {}
    for i, method in enumerate(methods):
        if shapes is not None:
            try:
                counts[i] = shape_count(shapes, method)
            except (NotModelled, UserError):  # the meta model tells the same, or says what is wrong
                pass
    inventory = memory.inventory_of_shapes(shapes) if shapes is not None and precision is not None else None
    rest = [i for i in range(len(methods)) if i not in counts]
    if rest:
        from peftcli.models.load import meta_model

        base = meta_model(source, task, trust_remote_code)
        if precision is not None and inventory is None:
            inventory = _inventory_of_model(base)  # before a method is injected into it
        for n, i in enumerate(rest):
            model = base if n == len(rest) - 1 else copy.deepcopy(base)  # see injected_counts
            try:
                counts[i] = injected_counts(model, [methods[i]], task)[0]
            except UserError as e:
                counts[i] = Count(methods[i].name, 0, 0, error=str(e))
    return _with_memory([counts[i] for i in range(len(methods))], inventory, precision)


def _with_memory(counts: list[Count], inventory, precision: Precision | None) -> list[Count]:
    if precision is None:
        return counts
    frozen = memory.frozen_bytes(inventory, precision)
    return [
        dataclasses.replace(c, frozen_bytes=frozen, trained_bytes=memory.trained_bytes(c.trainable))
        for c in counts
    ]


def _inventory_of_model(model) -> memory.Inventory:
    """The memory inventory of a (meta) model: its tensors once each, its linear layers."""
    from transformers.pytorch_utils import Conv1D

    from peftcli.methods.modules import is_linear, layer_shape, output_head_names

    tensors = {name: p.numel() for name, p in model.named_parameters()}  # a tied tensor once
    linears = {
        name: Linear(*layer_shape(module), isinstance(module, Conv1D))
        for name, module in model.named_modules()
        if is_linear(module)
    }
    head = next(iter(output_head_names(model)), None)
    return memory.Inventory(tensors, linears, head)


def meta_counts(
    model: ModelSource | str,
    methods: list[MethodConfig],
    task: str | None = None,
    trust_remote_code: bool = False,
) -> list[Count]:
    """One Count per method, each injected into its own copy of the model built on the meta device."""
    from peftcli.models.load import meta_model

    source = resolve(model) if isinstance(model, str) else model
    return injected_counts(meta_model(source, task, trust_remote_code), methods, task)


def injected_counts(base, methods: list[MethodConfig], task: str | None = None) -> list[Count]:
    """One Count per method, each injected into its own copy of `base` (the last into `base` itself)."""
    from peftcli.methods.modules import count_parameters

    context = Context(task or _task_of(base))
    counts = []
    for i, method in enumerate(methods):
        # The last method may take the base itself: a deep copy of a 175B meta model costs ~0.6 s.
        model = base if i == len(methods) - 1 else copy.deepcopy(base)
        model = METHODS[method.name].inject(model, method, context)
        trainable, total = count_parameters(model)
        counts.append(Count(method.name, trainable, total))
    return counts


def _task_of(model) -> str:
    name = type(model).__name__
    return "sequence-classification" if "SequenceClassification" in name else "causal-lm"


def shape_count(shapes: Shapes, method: MethodConfig) -> Count:
    """The Count that injecting `method` into the model `shapes` describes would give.

    Raises NotModelled, or the UserError inject() would raise, where it cannot tell exactly.
    """
    names, required = saved_modules(method, shapes.task)
    saved = layout.outermost([n for n in shapes.module_names() if any(layout.matches(n, t) for t in names)])
    if required and names and not saved:
        raise NotModelled("modules_to_save matches nothing here (or only modules without parameters)")
    trainable, added = METHODS[method.name].count(shapes, method, saved)
    # modules_to_save: a trained copy of each module beside its original (a tied tensor: once per copy)
    copies = sum(shapes.numel(name) for name in saved)
    return Count(method.name, trainable + copies, shapes.numel() + added + copies)


def count_target(
    target: str,
    method_names: list[str],
    overrides: dict,
    task: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
) -> tuple[str, list[Count], Precision]:
    """`peft count TARGET`: (the model counted, one Count per method with its memory, the precision that
    memory assumes). TARGET is a model (dir, .gguf, hub id, built-in name), a recipe (its model and
    method), or an adapter dir (its base and method). `overrides`: the command line's method flags (None: not
    given); `dtype`, `quantize`: the command line's (None: the recipe's or the run's, else auto)."""
    settings = ("auto", "auto")
    if target.endswith((".yaml", ".yml")):
        from peftcli.recipe import load_recipe

        recipe = load_recipe(target)
        model, base, task = recipe.model.source, recipe.method, task or recipe.model.task
        settings = (recipe.model.dtype, recipe.model.quantize)
    elif (Path(target) / ADAPTER_CONFIG).is_file():  # an adapter dir, ours or HF PEFT's
        from peftcli.runs.adapter import AdapterDir

        adapter = AdapterDir(target)
        if not adapter.config.get("base_model_name_or_path"):
            raise UserError(
                f"{adapter.config_path}: no base_model_name_or_path; "
                "count the base model with --method instead"
            )
        model, base, task = adapter.base_source, adapter.method, task or adapter.task
        settings = adapter.precision()
    else:
        model, base = target, None  # each method with its own defaults
    if task is not None and task not in TASK_TYPES:
        raise UserError(f"--task: unknown task {task!r}; choose one of {', '.join(TASK_TYPES)}")
    configs = method_configs(base, method_names or [base.name if base else "lora"], overrides)
    source = resolve(model) if isinstance(model, str) else model
    precision = _precision(source, dtype or settings[0], quantize or settings[1])
    counts = count_methods(source, configs, task, precision=precision)
    if all(c.error for c in counts):  # nothing to show: the reasons are the answer
        raise UserError("; ".join(dict.fromkeys(c.error for c in counts)))
    return source.name, counts, precision


def _precision(source: ModelSource, dtype: str, quantize: str) -> Precision:
    """The command line's --dtype and --quantize, checked, resolved as the loader would (no CUDA probe)."""
    if dtype not in ("auto", *DTYPE_BYTES):
        raise UserError(f"--dtype: unknown dtype {dtype!r}; choose auto, {', '.join(DTYPE_BYTES)}")
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(
            f"--quantize: unknown value {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}"
        )
    return resolve_precision(dtype, quantize, gguf=bool(source.gguf_file), probe_cuda=False)


def method_configs(base: MethodConfig | None, names: list[str], overrides: dict) -> list[MethodConfig]:
    """One Config per method name: the fields `base` (a recipe's or an adapter's method; None: none) shares
    with it, then the command line's flags (None: not given; a flag the method has no field for does not
    apply to it)."""
    configs = []
    for name in names:
        cls = _method_class(name)
        fields = {f.name for f in dataclasses.fields(cls)}
        shared = dataclasses.asdict(base).items() if base is not None else ()
        values = {k: v for k, v in shared if k in fields}
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "target_modules":
                parts = [t.strip() for t in value.split(",") if t.strip()]
                value = "all-linear" if parts == ["all-linear"] else parts
            elif value <= 0:
                raise UserError(f"--{key.replace('_', '-').replace('-size', '')}: must be > 0, got {value}")
            if key in fields:
                values[key] = value
        configs.append(cls(**values))
    return configs


def _method_class(name: str) -> type[MethodConfig]:
    try:
        return config_class(name)
    except UserError as e:
        raise UserError(str(e).replace("method.name:", "--method:", 1)) from e
