"""The streaming half of `peft merge`: plan, then write the merged weights shard by shard.

The plan is made from the base's safetensors headers and a meta-device model before any tensor is read:
each checkpoint key is mapped to the model's key, each adapted layer's weight to the method's fold
(LoRA: W + scale * B @ A; and its bias where the method changes it, IA3), and every other adapter tensor
(BitFit biases, ``modules_to_save``) to the base
tensor it replaces. The writer then reads one base tensor at a time, changes it if the adapter touches it,
casts it and appends it to the output shard through models/shards.py; nothing else is held. to_dir.py decides
when this applies.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from peftcli import fileio
from peftcli.errors import UserError
from peftcli.methods.modules import KEY_PREFIX, AdaptedLayer, adapted_layers, shared_tensors
from peftcli.models import shards as st
from peftcli.models.load import auto_class
from peftcli.models.shards import INDEX_NAME, SINGLE_NAME
from peftcli.runs.adapter import AdapterDir, apply_adapter

GENERATION_CONFIG = "generation_config.json"


@dataclass
class Plan:
    config: object  # the merged model's transformers config
    # Output shards in order; each entry is (output key, (base shard, its header entry), or None: adapter
    # only).
    shards: list[list[tuple[str, tuple[Path, st.TensorInfo] | None]]]
    shapes: dict[str, tuple[int, ...]]  # output key -> shape
    dtypes: dict[str, torch.dtype]  # output key -> dtype before the cast
    # weight (or bias) key -> (the adapted layer, holding the adapter's tensors, and the method's fold)
    folds: dict[str, tuple[AdaptedLayer, Callable[[AdaptedLayer, Tensor], Tensor]]]
    replaced: dict[str, Tensor]  # key -> the adapter's tensor (BitFit biases, modules_to_save)
    base_dtype: torch.dtype  # the floating dtype most of the base's elements have
    base_dir: Path


class _CannotStream(Exception):
    """Why this base or adapter is merged in memory instead."""


def stream_plan(
    adapter: AdapterDir, config, shard_paths: list[Path], base_dir: Path
) -> tuple[Plan | None, str]:
    """(plan, "") or (None, why streaming does not apply). Raises when the adapter does not fit the base.

    `config`: the base's transformers config for the adapter's task; the plan's merged config is this one.
    """
    with torch.device("meta"):
        meta = auto_class(adapter.task).from_config(config)
    config.architectures = [type(meta).__name__]
    expected = {key: tuple(t.shape) for key, t in meta.state_dict().items()}
    ties = _tie_groups(meta)
    prefix = getattr(meta, "base_model_prefix", "")
    try:
        folds, replaced = _adapter_tensors(adapter, meta, expected)
        shards, sources, dtypes, elements = _base_tensors(shard_paths, expected, prefix, replaced)
        extra, split = _ties_and_new_tensors(adapter, ties, expected, folds, replaced, sources, dtypes)
    except _CannotStream as e:
        return None, str(e)
    if split:
        config.get_text_config().tie_word_embeddings = False
        config.tie_word_embeddings = False
    base_dtype = max(elements, key=elements.get) if elements else torch.float32
    shards = [entries for entries in [*shards, extra] if entries]
    return Plan(config, shards, expected, dtypes, folds, replaced, base_dtype, base_dir), ""


def _adapter_tensors(adapter: AdapterDir, meta: nn.Module, expected: dict) -> tuple[dict, dict]:
    """(folds: weight key -> (layer, fold), replaced: key -> the adapter's tensor for that base tensor)."""
    # The method's own inject + load on the meta model: the same key and shape checks as a real load.
    meta = apply_adapter(meta, adapter.module, adapter.method, adapter.task, adapter.state)
    folds, layer_keys = {}, set()
    for name, layer in adapted_layers(meta):
        if not hasattr(adapter.module, "fold"):
            raise _CannotStream(f"{adapter.method.name} has no tensor-wise fold")
        # The layer's own parts take the adapter's real tensors; its base stays on the meta device.
        for part in list(layer.parts()):
            key = f"{KEY_PREFIX}{name}.{part}"
            owner, _, leaf = part.rpartition(".")
            layer.get_submodule(owner).register_parameter(leaf, nn.Parameter(adapter.state[key], False))
            layer_keys.add(key)
        folds[f"{name}.weight"] = (layer, adapter.module.fold)
        if getattr(adapter.module, "fold_bias", None) and layer.base.bias is not None:
            folds[f"{name}.bias"] = (layer, adapter.module.fold_bias)
    # Tensors the layers share (VeRA's projections) are real even on the meta model: loaded or drawn.
    shared = shared_tensors(meta)
    if any(t.is_meta for t in shared.values()):
        raise _CannotStream(f"{adapter.method.name}'s shared tensors are not materialised")
    layer_keys.update(shared)
    # Every other adapter tensor (BitFit's biases, modules_to_save) is the new value of a base tensor.
    replaced = {key.removeprefix(KEY_PREFIX): t for key, t in adapter.state.items() if key not in layer_keys}
    unknown = sorted(set(folds).union(replaced) - set(expected))
    if unknown:
        raise _CannotStream(f"the adapter's `{unknown[0]}` is no tensor of the plain model")
    return folds, replaced


def _base_tensors(shard_paths: list[Path], expected: dict, prefix: str, replaced: dict):
    """Each shard's (model key, (shard, header entry)) in file order, and by key: the source, the dtype;
    and the element count per floating dtype."""
    shards, sources, dtypes, elements = [], {}, {}, {}
    for path in shard_paths:
        entries = []
        for ckpt_key, info in st.read_header(path).items():
            key = st.model_key(ckpt_key, expected, prefix)
            if key is None:
                continue  # a tensor the task's model has no place for (e.g. lm_head for a classifier)
            if key in sources:
                raise _CannotStream(f"two checkpoint tensors map to `{key}`")
            if info.dtype is None:
                raise _CannotStream(
                    f"`{ckpt_key}` in {path.name} has dtype {info.code}, which peftcli cannot stream"
                )
            if info.shape != expected[key] and key not in replaced:
                raise _CannotStream(f"`{ckpt_key}` has shape {info.shape}, the model expects {expected[key]}")
            sources[key], dtypes[key] = (path, info), info.dtype
            if info.dtype.is_floating_point:
                elements[info.dtype] = elements.get(info.dtype, 0) + math.prod(info.shape)
            entries.append((key, sources[key]))
        shards.append(entries)
    return shards, sources, dtypes, elements


def _ties_and_new_tensors(adapter, ties, expected, folds, replaced, sources, dtypes) -> tuple[list, bool]:
    """(tensors to write beyond the base's own, whether tied tensors are now split).

    Tied tensors (lm_head = embed_tokens) are written once and tied again on load, unless the adapter
    replaces one of them: then each is written with its own value and the config unties them. A tensor
    the adapter brings that the base checkpoint lacks (a new head) is written too.
    """
    extra, split = [], False
    for group in ties:
        tied_folds = [key for key in group if key in folds]
        if tied_folds:
            layer = tied_folds[0].removesuffix(".weight")
            raise UserError(
                f"cannot merge {adapter.method.name} into `{layer}`: its weight is "
                "shared with another layer (tied embeddings), which the merge would change too"
            )
        if any(key in replaced for key in group):
            split = True
            base_key = next((key for key in group if key in sources), None)
            for key in group:
                if key not in sources and key not in replaced and base_key is not None:
                    extra.append((key, sources[base_key]))
                    dtypes[key] = dtypes[base_key]
    tied = {key for group in ties for key in group}
    for key in expected:
        if key in replaced and key not in sources:
            extra.append((key, None))
            dtypes[key] = replaced[key].dtype
        elif key not in sources and key not in tied:
            raise _CannotStream(f"the base checkpoint has no tensor for `{key}`")
    return extra, split


def _tie_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (tied embeddings), one list per tensor."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def write_streamed(plan: Plan, directory: Path, out_dtype: torch.dtype) -> None:
    """The merged weights as safetensors shards (+ index when more than one), and config.json."""
    count = len(plan.shards)
    names = (
        [SINGLE_NAME]
        if count == 1
        else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    )
    weight_map, total = {}, 0
    for name, entries in zip(names, plan.shards, strict=True):
        specs = [(key, _cast_dtype(plan.dtypes[key], out_dtype), plan.shapes[key]) for key, _ in entries]
        total += st.write_safetensors(directory / name, specs, _merged_tensors(plan, entries, out_dtype))
        weight_map.update(dict.fromkeys((key for key, _ in entries), name))
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        fileio.write_json(directory / INDEX_NAME, index)
    plan.config.dtype = out_dtype
    plan.config.save_pretrained(directory)
    if (plan.base_dir / GENERATION_CONFIG).is_file():
        shutil.copyfile(plan.base_dir / GENERATION_CONFIG, directory / GENERATION_CONFIG)


def _cast_dtype(dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    return out_dtype if dtype.is_floating_point else dtype


def _merged_tensors(plan: Plan, entries: list, out_dtype: torch.dtype) -> Iterator[Tensor]:
    """Each entry's merged tensor in turn: base (or the adapter's replacement) + LoRA delta, cast."""
    files = {}
    try:
        for key, source in entries:
            if key in plan.replaced:
                tensor = plan.replaced[key]
            else:
                path, info = source
                if path not in files:
                    files[path] = path.open("rb")
                tensor = st.read_tensor(files[path], info)
            if key in plan.folds:
                layer, fold = plan.folds[key]
                # The method's own fold, as its in-memory merge applies it: both paths write the same bits.
                tensor = fold(layer, tensor)
            yield tensor.to(_cast_dtype(tensor.dtype, out_dtype))
    finally:
        for f in files.values():
            f.close()
