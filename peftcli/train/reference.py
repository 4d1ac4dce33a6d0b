"""The reference policy's log-probabilities, computed once per data and model and cached beside the data.

DPO and KTO compare the policy to a reference: the model training starts from. Holding a second copy of the
model for it would double the memory, and running it every step would add a forward per pair; instead every
row's summed log-prob of its targets is computed once, before the first step, and kept with the tokenized
data (data/cache.py), so a step runs one policy forward per pair.

The reference is the base model with the adapter switched off (the method contract's `disabled`, which
also takes the virtual tokens out of prefix and prompt tuning, whose fresh adapters are not the identity).
Training that continues a saved adapter (method.from_adapter, e.g. DPO after the quickstart's SFT) takes
that adapter's model as the reference instead, as DPO's reference is the SFT model it starts from; it is
computed before any update, so no copy is needed either.

The cache file's key adds to the data's key what the log-probs depend on: the base model's files (name, size
and modification time, not their bytes), the adapter started from (its bytes), the weights' dtype and the
mixed precision they were computed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from peftcli.data import cache
from peftcli.data.batches import TokenizedDataset, collate
from peftcli.data.prepare import PreparedData
from peftcli.methods import disabled
from peftcli.recipe import Recipe

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".json")


def _files_stamp(paths: list[Path]) -> list:
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(paths) if p.is_file()]


def model_key(recipe: Recipe, mixed_precision: str) -> str:
    """What the reference log-probs depend on beyond the data, as a short hash."""
    m, source = recipe.model, recipe.model.source
    if source.gguf_file:
        files = _files_stamp([Path(source.path) / source.gguf_file])
    elif source.is_local:
        files = _files_stamp([p for p in Path(source.path).iterdir() if p.suffix in WEIGHT_SUFFIXES])
    else:  # a hub id: its revision names the files
        files = [source.name, m.revision]
    adapter = None
    if recipe.method.from_adapter:
        digest = hashlib.sha256()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            path = Path(recipe.method.from_adapter).expanduser() / name
            digest.update(path.read_bytes() if path.is_file() else b"")
        adapter = digest.hexdigest()
    parts = {
        "model": source.path,
        "files": files,
        "adapter": adapter,
        "dtype": m.dtype,
        "mp": mixed_precision,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_context(model: nn.Module, recipe: Recipe) -> contextlib.AbstractContextManager:
    """Where the model computes as the reference policy (see the module docstring)."""
    if recipe.method.from_adapter:
        return contextlib.nullcontext()
    return disabled(model, recipe.method.name)


@torch.no_grad()
def row_logprobs(
    model: nn.Module,
    split: TokenizedDataset,
    token_logprobs: Callable[[nn.Module, dict[str, Tensor]], Tensor],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Tensor:
    """(rows,) float32: each row's summed log-prob of its targets under `model` as it computes now."""
    sums = []
    for start in range(0, split.num_rows, batch_size):
        rows = [split.row(i) for i in range(start, min(start + batch_size, split.num_rows))]
        batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        with autocast():
            sums.append(token_logprobs(model, batch).sum(-1).float().cpu())
    return torch.cat(sums)


def attach(
    splits: dict[str, TokenizedDataset],
    model: nn.Module,
    recipe: Recipe,
    data: PreparedData,
    token_logprobs: Callable[[nn.Module, dict[str, Tensor]], Tensor],
    batch_size: int,
    accelerator,
    together: bool = False,
) -> bool:
    """Give every split its rows' reference log-probs: from the cache beside the tokenized data's file, else
    computed `batch_size` rows at a time in the reference context, in eval mode and the accelerator's
    autocast, and saved. Returns whether they came from the cache. `together`: every process computes them
    at once (a sharded model's forward is a collective), unless every process found the cache."""
    path = cache.reference_path(data.cache_path, model_key(recipe, accelerator.mixed_precision))
    found = cache.load_reference(path, {name: split.num_rows for name, split in splits.items()})
    hit = found is not None
    if together:
        hit = bool(accelerator.reduce(torch.tensor(float(hit), device=accelerator.device), "min"))
    if not hit:
        was_training = model.training
        model.eval()
        try:
            with reference_context(model, recipe):
                found = {
                    name: row_logprobs(
                        model,
                        split,
                        token_logprobs,
                        batch_size,
                        data.pad_id,
                        accelerator.device,
                        accelerator.autocast,
                    )
                    for name, split in splits.items()
                }
        finally:
            model.train(was_training)
        if accelerator.is_main_process or not together:
            cache.save_reference(path, found)
    for name, split in splits.items():
        split.reference_logps = found[name]
    return hit
