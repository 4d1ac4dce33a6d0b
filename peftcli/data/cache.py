"""The tokenized-data cache: one safetensors file per (data bytes, tokenizer, data settings) key.

A second run on the same data skips loading and tokenizing. Beside it, the reference policy's log-probs of
those rows (preference objectives), one file per reference model under the same key. A cache file that does
not read (another layout, a partial write) is made again; writing one never half-finishes (atomic rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from peftcli.data.batches import TokenizedDataset
from peftcli.fileio import atomic_write

CACHE_VERSION = 2  # bump when the rendering or the stored layout changes


def default_cache_dir() -> Path:
    """$PEFTCLI_CACHE/data when PEFTCLI_CACHE is set, else ~/.cache/peftcli/data."""
    root = os.environ.get("PEFTCLI_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "peftcli") / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [
        type(tokenizer).__name__,
        vocab,
        str(tokenizer.chat_template),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def save(path: Path, splits: dict[str, TokenizedDataset], label_names: list[str] | None) -> None:
    tensors, meta = {}, {"version": CACHE_VERSION, "label_names": label_names, "splits": {}}
    for name, split in splits.items():
        for field in ("input_ids", "loss_mask", "offsets", "class_labels", "desirable"):
            if getattr(split, field) is not None:
                tensors[f"{name}.{field}"] = getattr(split, field).contiguous()
        meta["splits"][name] = {
            k: getattr(split, k) for k in ("num_examples", "num_truncated", "num_dropped", "rows_per_example")
        }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"peftcli": json.dumps(meta)}))


def load(path: Path) -> tuple[dict[str, TokenizedDataset], list[str] | None] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["peftcli"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        splits = {
            name: TokenizedDataset(
                tensors[f"{name}.input_ids"],
                tensors[f"{name}.loss_mask"],
                tensors[f"{name}.offsets"],
                tensors.get(f"{name}.class_labels"),
                desirable=tensors.get(f"{name}.desirable"),
                **stats,
            )
            for name, stats in meta["splits"].items()
        }
    except Exception:  # unreadable or from another layout: make it again
        return None
    return (splits, meta["label_names"]) if meta.get("version") == CACHE_VERSION else None


def reference_path(data_path: Path, model_key: str) -> Path:
    """Where the reference log-probs of the data cached at `data_path` live, for one reference model."""
    return data_path.with_name(f"{data_path.stem}.reference-{model_key}.safetensors")


def save_reference(path: Path, logps: dict[str, Tensor]) -> None:
    """{split: (rows,) log-probs}."""
    tensors = {name: value.contiguous() for name, value in logps.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"version": str(CACHE_VERSION)}))


def load_reference(path: Path, rows: dict[str, int]) -> dict[str, Tensor] | None:
    """The saved log-probs when they fit `rows` ({split: number of rows}), else None (made again)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if f.metadata().get("version") != str(CACHE_VERSION):
                return None
            found = {key: f.get_tensor(key) for key in f.keys()}
    except Exception:  # unreadable: make it again
        return None
    fits = found.keys() == rows.keys() and all(found[k].shape == (n,) for k, n in rows.items())
    return found if fits else None
