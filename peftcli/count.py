"""`peft count`: trainable vs total parameters of methods, on the meta device (no weights, no download)."""

from __future__ import annotations

import copy
import dataclasses

from peftcli.errors import UserError, did_you_mean
from peftcli.methods import METHODS
from peftcli.methods.common import count_parameters
from peftcli.models import meta_model
from peftcli.recipe import METHOD_NAMES, MethodSection


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
    """One Count per method, each injected into its own copy of the meta model.

    Follows HF PEFT's convention: total = base + adapter parameters, each shared tensor once.
    """
    base = meta_model(model_name, task, trust_remote_code)
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
