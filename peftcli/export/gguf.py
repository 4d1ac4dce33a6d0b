"""Write a merged model (a plain transformers causal LM, adapter folded in) as one GGUF file.

The file holds: ``general.*`` (architecture, name, file type), llama.cpp's hyperparameters for the
architecture (arch.py), the tokenizer and chat template (tokenizer.py), and every parameter under llama.cpp's
name and layout (models/gguf_names.py) in the type quant.py chooses. Tensors are written one at a time
(each converted just before it is written), so the peak is the model plus one tensor's copies. A tensor a
GGUF base holds unchanged in the chosen type is copied from the base file byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from peftcli.export import quant
from peftcli.export.arch import hparams
from peftcli.export.tokenizer import F32_VALUE, STRING, U32, Metadata
from peftcli.models.gguf_header import GGUFFile
from peftcli.models.gguf_names import rotary_heads, to_gguf_name, to_llamacpp_rotary


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # llama.cpp's
    shape: tuple[int, ...]  # row-major
    ggml_type: int
    data: Callable[[], np.ndarray]  # the bytes (or floats) to write, made on demand


def model_tensors(
    model: nn.Module,
    arch: str,
    quant_type: int | None,
    base: GGUFFile | None = None,
    base_path: str | None = None,
    changed: set[str] = frozenset(),
) -> list[PlannedTensor]:
    """Every parameter of `model` (a tied one once) as llama.cpp's tensor. `changed`: the transformers names
    the adapter changed (a GGUF base's other tensors are copied from `base_path` where the type is kept)."""
    hp = hparams(model.config.get_text_config(), arch)
    blob = np.memmap(base_path, dtype=np.uint8, mode="r") if base is not None else None
    planned = []
    for hf_name, param in model.named_parameters():
        name, rule = to_gguf_name(arch, hf_name)
        shape = tuple(reversed(param.shape)) if rule.transposed else tuple(param.shape)
        base_info = base.tensor(name) if base is not None else None
        kind = quant.choose_type(
            shape, quant_type, base_info.ggml_type if base_info else None, changed=hf_name in changed
        )
        if base_info is not None and hf_name not in changed and kind == base_info.ggml_type:
            start, end = base_info.offset, base_info.offset + base_info.nbytes
            planned.append(PlannedTensor(name, shape, kind, lambda s=start, e=end: blob[s:e]))
            continue
        heads = rotary_heads(rule, hp.heads, hp.kv_heads)

        def data(param=param, rule=rule, heads=heads, kind=kind) -> np.ndarray:
            array = param.detach().float().cpu().numpy()
            if rule.transposed:
                array = array.T
            if heads is not None:
                array = to_llamacpp_rotary(array, heads)
            return quant.quantize(array, kind)

        planned.append(PlannedTensor(name, shape, kind, data))
    return planned


def write_gguf(
    path: str | Path,
    arch: str,
    metadata: Metadata,
    tensors: list[PlannedTensor],
    say: Callable[[str], None] | None = None,
) -> None:
    """One GGUF file: `metadata` (general.architecture comes from `arch`) and `tensors`, in order."""
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    writer = GGUFWriter(str(path), arch)
    for key, (value, kind, item_kind) in metadata.items():
        sub = GGUFValueType(item_kind) if item_kind is not None else None
        writer.add_key_value(key, value, GGUFValueType(kind), sub_type=sub)
    for t in tensors:
        float_type = {quant.F32: np.float32, quant.F16: np.float16}.get(t.ggml_type)
        raw = None if float_type else GGMLQuantizationType(t.ggml_type)
        writer.add_tensor_info(
            t.name, t.shape, np.dtype(float_type or np.float32), quant.nbytes(t.shape, t.ggml_type), raw
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(np.asarray(t.data()))
    writer.close()


def model_metadata(
    config, arch: str, name: str, tokenizer_keys: Metadata, file_type: int | None, quantized: bool
) -> Metadata:
    """``general.*``, the architecture's hyperparameters and the tokenizer's keys."""
    metadata: Metadata = {
        "general.type": ("model", STRING, None),
        "general.name": (name, STRING, None),
    }
    for key, value in hparams(config.get_text_config(), arch).keys.items():
        metadata[f"{arch}.{key}"] = (value, F32_VALUE if isinstance(value, float) else U32, None)
    if file_type is not None:
        metadata["general.file_type"] = (file_type, U32, None)
    if quantized:
        metadata["general.quantization_version"] = (
            2,
            U32,
            None,
        )  # the block layouts of ggml's current format
    metadata.update(tokenizer_keys)
    return metadata
