"""The streaming half of `peft merge`: plan, then write the merged weights shard by shard.

The plan is made from the base's safetensors headers and a meta-device model before any tensor is read:
each checkpoint key is mapped to the model's key, each LoRA layer to its delta (W + scale * B @ A), and
every other adapter tensor (BitFit biases, ``modules_to_save``) to the base tensor it replaces. The writer
then reads one base tensor at a time, changes it if the adapter touches it, casts it and appends it to the
output shard through `peftcli.shards`; nothing else is held. `peftcli.merge` decides when this applies.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from peftcli import checkpoint, fileio, models
from peftcli import shards as st
from peftcli.errors import UserError
from peftcli.methods import lora
from peftcli.methods.common import KEY_PREFIX

if TYPE_CHECKING:
    from peftcli.merge import _Job

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"


@dataclass
class Plan:
    config: object  # the merged model's transformers config
    # Output shards in order; each entry is (output key, (base shard, its header entry), or None: adapter
    # only).
    shards: list[list[tuple[str, tuple[Path, st.TensorInfo] | None]]]
    shapes: dict[str, tuple[int, ...]]  # output key -> shape
    dtypes: dict[str, torch.dtype]  # output key -> dtype before the cast
    deltas: dict[str, tuple[Tensor, Tensor, float, bool]]  # weight key -> LoRA (A, B, scale, fan_in_fan_out)
    replaced: dict[str, Tensor]  # key -> the adapter's tensor (BitFit biases, modules_to_save)
    base_dtype: torch.dtype  # the floating dtype most of the base's elements have
    base_dir: Path


def stream_plan(job: _Job, config, shard_paths: list[Path], base_dir: Path) -> tuple[Plan | None, str]:
    """(plan, "") or (None, why streaming does not apply). Raises when the adapter does not fit the base.

    `config`: the base's transformers config for the job's task; the plan's merged config is this one.
    """
    with torch.device("meta"):
        meta = models.auto_class(job.task).from_config(config)
    config.architectures = [type(meta).__name__]
    expected = {key: tuple(t.shape) for key, t in meta.state_dict().items()}
    ties = _tie_groups(meta)
    prefix = getattr(meta, "base_model_prefix", "")
    # The method's own inject + load on the meta model: the same key and shape checks as a real load.
    meta = checkpoint.apply_adapter(meta, job.module, job.method, job.task, job.state)
    deltas, factor_keys = {}, set()
    for name, layer in lora.lora_layers(meta):
        a_key, b_key = f"{KEY_PREFIX}{name}.lora_A.weight", f"{KEY_PREFIX}{name}.lora_B.weight"
        deltas[f"{name}.weight"] = (job.state[a_key], job.state[b_key], layer.scale, layer.fan_in_fan_out)
        factor_keys |= {a_key, b_key}
    # Every other adapter tensor (BitFit's biases, modules_to_save) is the new value of a base tensor.
    replaced = {key.removeprefix(KEY_PREFIX): t for key, t in job.state.items() if key not in factor_keys}
    del meta
    unknown = sorted(set(deltas).union(replaced) - set(expected))
    if unknown:
        return None, f"the adapter's `{unknown[0]}` is no tensor of the plain model"

    shards, sources, dtypes, elements = [], {}, {}, {}
    for path in shard_paths:
        entries = []
        for ckpt_key, info in st.read_header(path).items():
            key = _model_key(ckpt_key, expected, prefix)
            if key is None:
                continue  # a tensor the task's model has no place for (e.g. lm_head for a classifier)
            if key in sources:
                return None, f"two checkpoint tensors map to `{key}`"
            if info.dtype is None:
                return None, f"`{ckpt_key}` in {path.name} has dtype {info.code}, which peftcli cannot stream"
            if info.shape != expected[key] and key not in replaced:
                return None, f"`{ckpt_key}` has shape {info.shape}, the model expects {expected[key]}"
            sources[key], dtypes[key] = (path, info), info.dtype
            if info.dtype.is_floating_point:
                elements[info.dtype] = elements.get(info.dtype, 0) + math.prod(info.shape)
            entries.append((key, sources[key]))
        shards.append(entries)

    # Tied tensors (lm_head = embed_tokens) are written once and tied again on load, unless the adapter
    # replaces one of them: then each is written with its own value and the config unties them.
    extra, split = [], False
    for group in ties:
        tied_lora = [key for key in group if key in deltas]
        if tied_lora:
            layer = tied_lora[0].removesuffix(".weight")
            raise UserError(
                f"cannot merge LoRA into `{layer}`: its weight is "
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
            return None, f"the base checkpoint has no tensor for `{key}`"
    if split:
        config.get_text_config().tie_word_embeddings = False
        config.tie_word_embeddings = False
    base_dtype = max(elements, key=elements.get) if elements else torch.float32
    shards = [entries for entries in [*shards, extra] if entries]
    return Plan(config, shards, expected, dtypes, deltas, replaced, base_dtype, base_dir), ""


def _tie_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (tied embeddings), one list per tensor."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _model_key(ckpt_key: str, expected: dict, prefix: str) -> str | None:
    """The model's name for a checkpoint tensor: the same, or under the base model's prefix (a checkpoint
    of LlamaModel stores `layers.0...`, LlamaForCausalLM `model.layers.0...`)."""
    if ckpt_key in expected:
        return ckpt_key
    if prefix and f"{prefix}.{ckpt_key}" in expected:
        return f"{prefix}.{ckpt_key}"
    return None


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
            if key in plan.deltas:
                lora_a, lora_b, scale, fan_in_fan_out = plan.deltas[key]
                delta = lora.delta_weight(lora_a, lora_b, scale, fan_in_fan_out)
                # lora.merge's arithmetic, so both paths write the same bits: add in float32, round once.
                tensor = tensor.to(delta.dtype) + delta
            yield tensor.to(_cast_dtype(tensor.dtype, out_dtype))
    finally:
        for f in files.values():
            f.close()
