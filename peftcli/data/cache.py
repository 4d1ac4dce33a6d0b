"""The tokenized-data cache: one safetensors file per (data bytes, tokenizer, data settings) key.

A second run on the same data skips loading and tokenizing. A cache file that does not read (another
layout, a partial write) is made again; writing one never half-finishes (atomic rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from peftcli.data.batches import TokenizedDataset
from peftcli.fileio import atomic_write

CACHE_VERSION = 1  # bump when the rendering or the stored layout changes


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
        for field in ("input_ids", "loss_mask", "offsets", "class_labels"):
            if getattr(split, field) is not None:
                tensors[f"{name}.{field}"] = getattr(split, field).contiguous()
        meta["splits"][name] = {
            k: getattr(split, k) for k in ("num_examples", "num_truncated", "num_dropped")
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
                **stats,
            )
            for name, stats in meta["splits"].items()
        }
    except Exception:  # unreadable or from another layout: make it again
        return None
    return (splits, meta["label_names"]) if meta.get("version") == CACHE_VERSION else None
