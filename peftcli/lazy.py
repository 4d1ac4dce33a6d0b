"""torch, imported on first use, for the modules that `peft count` reads.

A method module holds its config and its parameter arithmetic (which `peft count` needs, and which answers
from config.json in half a second) beside its layers (which need torch: importing it alone takes three).
Those modules name torch through these stand-ins, which import the real module the first time one of its
attributes is read; nothing in them may touch torch at import time (no ``@torch.no_grad()`` decorators).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


class LazyModule:
    """Stands in for module `name`; the first attribute read imports it."""

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name}{'' if self._module is None else ' (imported)'}>"


def is_conv1d(module) -> bool:
    """Whether `module` is GPT-2's Conv1D (transformers.pytorch_utils), without importing transformers (a
    second): where that module was never imported, nothing can be one."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


torch = LazyModule("torch")
nn = LazyModule("torch.nn")
F = LazyModule("torch.nn.functional")
