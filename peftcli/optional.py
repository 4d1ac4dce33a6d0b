"""Optional dependencies: imported where a feature needs one, and named with the extra that installs it.

`pip install peftcli` installs what `peft train` on a transformers or GGUF model needs; features beyond
that (plots, quantized bases, GGUF export, ...) come with an extra, `pip install 'peftcli[NAME]'`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from peftcli.errors import UserError


def need(module: str, extra: str, feature: str) -> ModuleType:
    """`module`, imported; if it is not installed, a one-line error naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise UserError(
            f"{feature} needs the Python package `{package}`, which is not installed: "
            f"pip install 'peftcli[{extra}]'"
        ) from e
