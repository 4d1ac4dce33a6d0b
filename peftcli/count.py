"""`peft count`: trainable vs total parameters of methods, without weights or downloads.

From the config's shapes alone where shapes.py models the architecture (no torch import: well under a
second), else by injecting each method into the model built on the meta device. Both follow HF PEFT's
convention: total = base + adapter parameters, each shared tensor once; tests hold the two equal.
"""

from __future__ import annotations

import dataclasses

from peftcli import layout
from peftcli.errors import UserError, did_you_mean
from peftcli.recipe import METHOD_NAMES, MethodSection, method_choices
from peftcli.shapes import NotModelled, Shapes, config_shapes


@dataclasses.dataclass
class Count:
    method: str
    trainable: int
    total: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "trainable": self.trainable,
            "total": self.total,
            "trainable_percent": round(self.trainable_percent, 6),
        }


def count_methods(
    model_name: str, methods: list[MethodSection], task: str | None = None, trust_remote_code: bool = False
) -> list[Count]:
    """One Count per method: from the config's shapes where they are modelled, else on the meta model."""
    shapes = config_shapes(model_name, task, trust_remote_code)
    if shapes is not None:
        try:
            return [shape_count(shapes, method) for method in methods]
        except (NotModelled, UserError):  # the meta model tells the same, or says what is wrong
            pass
    return meta_counts(model_name, methods, task, trust_remote_code)


def meta_counts(
    model_name: str, methods: list[MethodSection], task: str | None = None, trust_remote_code: bool = False
) -> list[Count]:
    """One Count per method, each injected into its own copy of the model built on the meta device."""
    from peftcli.models import meta_model

    return injected_counts(meta_model(model_name, task, trust_remote_code), methods, task)


def injected_counts(base, methods: list[MethodSection], task: str | None = None) -> list[Count]:
    """One Count per method, each injected into its own copy of `base` (the last into `base` itself)."""
    import copy

    from peftcli.methods import METHODS
    from peftcli.methods.common import count_parameters

    resolved_task = task or _task_of(base)
    counts = []
    for i, method in enumerate(methods):
        # The last method may take the base itself: a deep copy of a 175B meta model costs ~0.6 s.
        model = base if i == len(methods) - 1 else copy.deepcopy(base)
        model = METHODS[method.name].inject(model, method, resolved_task)
        trainable, total = count_parameters(model)
        counts.append(Count(method.name, trainable, total))
    return counts


def _task_of(model) -> str:
    name = type(model).__name__
    return "sequence-classification" if "SequenceClassification" in name else "causal-lm"


# --------------------------------------------------------------------------------------------------
# From shapes: what each method's inject() adds, by the same rules (layout.py) on names and sizes


def shape_count(shapes: Shapes, method: MethodSection) -> Count:
    """The Count that injecting `method` into the model `shapes` describes would give.

    Raises NotModelled, or the UserError inject() would raise, where it cannot tell exactly.
    """
    save = layout.default_modules_to_save(method.modules_to_save, shapes.task)
    # LoRA and the virtual-token methods require a match only for names the recipe gave; the others for any.
    required = bool(save) if method.name in ("adapter", "bitfit") else method.modules_to_save is not None
    saved = _saved_modules(shapes, save, required)
    trainable, added = _SHAPE_COUNTS[method.name](shapes, method, saved)
    # modules_to_save: a trained copy of each module beside its original (a tied tensor: once per copy)
    copies = sum(shapes.numel(name) for name in saved)
    return Count(method.name, trainable + copies, shapes.numel() + added + copies)


def _saved_modules(shapes: Shapes, save: list[str], required: bool) -> list[str]:
    found = layout.outermost([n for n in shapes.module_names() if any(layout.matches(n, t) for t in save)])
    if required and save and not found:
        raise NotModelled("modules_to_save matches nothing here (or only modules without parameters)")
    return found


def _lora_count(shapes: Shapes, method: MethodSection, saved: list[str]) -> tuple[int, int]:
    targets = method.target_modules
    if targets is None:
        targets = layout.default_targets(shapes.model_type)
    skip = {shapes.output_head} if targets == "all-linear" and shapes.output_head else set()
    names = layout.select_targets(list(shapes.linears), targets, skip)
    names = [n for n in names if not layout.inside(n, saved)]
    layers = [shapes.linears[n] for n in names]
    if not layers or any(method.rank > min(x.in_features, x.out_features) for x in layers):
        raise NotModelled("inject() refuses this")
    added = sum(method.rank * (x.in_features + x.out_features) for x in layers)
    return added, added


def _prompt_count(shapes: Shapes, method: MethodSection, saved: list[str]) -> tuple[int, int]:
    added = method.num_virtual_tokens * shapes.embed_dim
    return added, added


def _prefix_count(shapes: Shapes, method: MethodSection, saved: list[str]) -> tuple[int, int]:
    token_dim = shapes.num_kv_heads * shapes.head_dim
    width = shapes.num_layers * 2 * token_dim  # a key and a value per layer
    if not method.prefix_projection:
        added = method.num_virtual_tokens * width
    else:  # the table, then Linear(token_dim -> hidden), Tanh, Linear(hidden -> width)
        hidden = method.encoder_hidden_size or token_dim
        added = method.num_virtual_tokens * token_dim + (token_dim + 1) * hidden + (hidden + 1) * width
    return added, added


def _adapter_count(shapes: Shapes, method: MethodSection, saved: list[str]) -> tuple[int, int]:
    if not all(getattr(method, f) in method_choices(f) for f in ("activation", "placement")):
        raise NotModelled("inject() refuses this")
    if method.target_modules is None:
        free = [n for n in shapes.module_names() if not layout.inside(n, saved)]
        sites = layout.adapter_sites(free, shapes.model_type, method.placement)
    else:  # matched as inject() does: after the saved modules are wrapped, so inside them under new names
        linears = [wrapped for n in shapes.linears for wrapped in _wrapped_names(n, saved)]
        skip = {shapes.output_head} if method.target_modules == "all-linear" and shapes.output_head else set()
        sites = layout.select_targets(linears, method.target_modules, skip)
        sites = [n for n in sites if not layout.inside(n, saved)]
    if not sites or any(n not in shapes.linears for n in sites):
        raise NotModelled("adapter sites")
    added = 0
    for name in sites:
        hidden = shapes.linears[name].out_features
        size = layout.bottleneck_size(method, hidden)
        added += (hidden + 1) * size + (size + 1) * hidden  # down: hidden -> size, up: size -> hidden
    return added, added


def _wrapped_names(name: str, saved: list[str]) -> list[str]:
    """`name` as named_modules() shows it once the saved module holding it is wrapped (ModulesToSave)."""
    for module in saved:
        if layout.inside(name, [module]):
            rest = name.removeprefix(module)
            return [f"{module}.original_module{rest}", f"{module}.trained{rest}"]
    return [name]


def _bitfit_count(shapes: Shapes, method: MethodSection, saved: list[str]) -> tuple[int, int]:
    owners = [n for n in shapes.bias_owners() if not layout.inside(n, saved)]
    chosen = layout.select_biases(owners, method.biases, shapes.model_type)
    return sum(shapes.params[f"{n}.bias"][1] for n in chosen), 0  # trains biases the model has


_SHAPE_COUNTS = {
    "lora": _lora_count,
    "prefix-tuning": _prefix_count,
    "prompt-tuning": _prompt_count,
    "adapter": _adapter_count,
    "bitfit": _bitfit_count,
}


def method_sections(base: MethodSection, names: list[str], overrides: dict) -> list[MethodSection]:
    """One MethodSection per method name: `base` with the command line's flags (None: not given)."""
    sections = []
    for name in names:
        if name not in METHOD_NAMES:
            raise UserError(
                f"--method: unknown method {name!r}{did_you_mean(name, METHOD_NAMES)}; "
                f"choose from {', '.join(METHOD_NAMES)}"
            )
        section = dataclasses.replace(base, name=name)
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "target_modules":
                parts = [t.strip() for t in value.split(",") if t.strip()]
                value = "all-linear" if parts == ["all-linear"] else parts
            elif value <= 0:
                raise UserError(f"--{key.replace('_', '-').replace('-size', '')}: must be > 0, got {value}")
            setattr(section, key, value)
        sections.append(section)
    return sections
