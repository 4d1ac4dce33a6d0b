"""Load a base model one tensor at a time, quantizing its frozen linear layers as their weights arrive.

The model is built on the meta device (its buffers, such as rotary frequencies, computed for real), then
each checkpoint tensor is read, converted and put in place: a weight a format quantizes becomes its
quantized layer at once, a GGUF block tensor is packed straight from its bytes (quant/ggml.py), anything else
is cast to the model's dtype. The full-precision model never exists: peak memory while loading is about the
loaded model plus one tensor.

Sources: a local safetensors model (one file or shards, names as the model's own or under its base-model
prefix) and a llama-architecture GGUF file. Anything these cannot place exactly (another GGUF
architecture, a checkpoint with missing or differently named tensors, a dtype safetensors' reader here does
not know) raises CannotFill, and load.py loads the model whole the usual way instead, then quantizes it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from peftcli.models import shards as st
from peftcli.models.gguf_header import GGUFError, GGUFFile, read_gguf
from peftcli.models.gguf_load import dense, read_rows, to_transformers_layout
from peftcli.models.gguf_names import to_hf_name
from peftcli.quant import ggml
from peftcli.quant.blocks import BlockEmbedding, BlockLinear, Blocks
from peftcli.quant.convert import is_quantized, quantize_linear, quantize_targets, set_submodule
from peftcli.quant.formats import CLASSIFIER_HEADS, FORMATS


class CannotFill(Exception):
    """Why this source is loaded whole instead."""


def load_filled(model_class, config, source, dtype: torch.dtype, quantize: str, task: str) -> nn.Module:
    """The model of `model_class` (an Auto class) for `config`, filled from `source` (a ModelSource) with its
    linear layers stored as `quantize` (none | int8 | int4 | nf4 | gguf: a GGUF file's own blocks)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config)
    return fill(model, config, source, dtype, quantize, task == "sequence-classification")


def fill(
    model: nn.Module,
    config,
    source,
    dtype: torch.dtype,
    quantize: str = "none",
    classifier: bool = False,
    gguf: GGUFFile | None = None,
) -> nn.Module:
    """`model`, whose parameters are on the meta device (named as transformers names them), filled from
    `source` as `load_filled` fills it; `config` its config (tie_word_embeddings, the attention heads);
    `gguf` the GGUF file's header where the caller has read it already."""
    filler = _Filler(model, quantize, dtype, classifier)
    if source.gguf_file:
        path = Path(source.path) / source.gguf_file
        _fill_from_gguf(filler, path, config.get_text_config(), quantize, gguf)
    else:
        paths = st.safetensors_shards(source)
        if not paths:
            raise CannotFill("no safetensors weights in the model dir")
        _fill_from_safetensors(filler, paths)
    filler.finish(config)
    model.config.dtype = dtype
    return model


class _Filler:
    """Puts tensors into the meta model by name; quantizes the target linear layers' weights on arrival."""

    def __init__(self, model: nn.Module, quantize: str, dtype: torch.dtype, classifier: bool):
        self.model, self.quantize, self.dtype, self.classifier = model, quantize, dtype, classifier
        self.targets = set(quantize_targets(model, quantize)) if quantize in FORMATS else set()
        self.shapes = {k: tuple(t.shape) for k, t in model.state_dict(keep_vars=True).items()}
        self.prefix = getattr(model, "base_model_prefix", "")

    def key_of(self, checkpoint_key: str) -> str | None:
        return st.model_key(checkpoint_key, self.shapes, self.prefix)

    def put(self, key: str, tensor: Tensor) -> None:
        """The model tensor `key` (a checkpoint's name mapped to the model's) takes `tensor`."""
        if tuple(tensor.shape) != self.shapes[key]:
            if self.classifier and key.split(".", 1)[0] in CLASSIFIER_HEADS:
                return  # a head of another size: a fresh one of the recipe's size (finish)
            raise CannotFill(f"`{key}` has shape {tuple(tensor.shape)}, the model expects {self.shapes[key]}")
        module_name, _, leaf = key.rpartition(".")
        module = self.model.get_submodule(module_name)
        if leaf == "weight" and module_name in self.targets:
            self.replace(module_name, quantize_linear(tensor, None, self.quantize, self.dtype, key))
        elif leaf == "bias" and is_quantized(module):
            module.bias = nn.Parameter(tensor.to(self.dtype), requires_grad=False)
        else:
            _assign(module, leaf, tensor.to(self.dtype) if tensor.is_floating_point() else tensor)

    def put_blocks(self, module_name: str, blocks: Blocks, format: str) -> None:
        """A linear layer or embedding takes its weight packed."""
        module = self.model.get_submodule(module_name)
        if (blocks.rows, blocks.columns) != tuple(module.weight.shape):
            raise CannotFill(
                f"`{module_name}` packs as {(blocks.rows, blocks.columns)}, "
                f"the model expects {tuple(module.weight.shape)}"
            )
        if isinstance(module, nn.Embedding):
            self.replace(module_name, BlockEmbedding(blocks, self.dtype, module.padding_idx, format))
        else:
            self.replace(module_name, BlockLinear(blocks, None, self.dtype, format))

    def replace(self, module_name: str, new: nn.Module) -> None:
        """Swap in a quantized layer, keeping the old layer's bias (loaded already or still to come)."""
        old = self.model.get_submodule(module_name)
        if is_quantized(new) and getattr(old, "bias", None) is not None:
            new.bias = old.bias
        set_submodule(self.model, module_name, new)

    def finish(self, config) -> None:
        """Tie the output head to the embedding where the config says so; give a classifier a fresh head;
        refuse anything the checkpoint left empty."""
        head, embedding = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
        if (
            tied
            and head is not None
            and isinstance(getattr(head, "weight", None), Tensor)
            and head.weight.is_meta
        ):
            if isinstance(embedding, BlockEmbedding):
                self.replace(
                    _name_of(self.model, head),
                    BlockLinear(embedding.blocks, None, self.dtype, embedding.format),
                )
            else:
                head.weight = embedding.weight
        for name, module in self.model.named_modules():
            if (
                name.split(".", 1)[0] in CLASSIFIER_HEADS
                and self.classifier
                and _holds_meta(module, recurse=False)
            ):
                module.to_empty(device="cpu", recurse=False)
                self.model._init_weights(module)
                module.to(self.dtype)
        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if tensor.is_meta:
                raise CannotFill(f"the checkpoint has no tensor for `{name}`")


def _fill_from_safetensors(filler: _Filler, paths: list[Path]) -> None:
    for path in paths:
        header = st.read_header(path)
        with path.open("rb") as f:
            for checkpoint_key, info in header.items():
                key = filler.key_of(checkpoint_key)
                if key is None:
                    continue  # a tensor the model has no place for (transformers drops it too)
                if info.dtype is None:
                    raise CannotFill(f"`{checkpoint_key}` has dtype {info.code}")
                filler.put(key, st.read_tensor(f, info))


def _fill_from_gguf(filler: _Filler, path: Path, text_config, quantize: str, gguf: GGUFFile | None) -> None:
    """Each tensor of a llama GGUF file, in transformers' layout (gguf_load.py): packed where `quantize`
    keeps blocks and the type packs, else dequantized. `gguf`: its header (None: read here)."""
    try:
        gguf = gguf or read_gguf(str(path))
    except GGUFError as e:
        raise CannotFill(f"{path.name}: {e}") from e
    architecture = gguf.metadata.get("general.architecture")
    if architecture != "llama":
        raise CannotFill(f"GGUF architecture {architecture!r}: only llama's tensor names are mapped here")
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    keep_blocks = quantize in ("gguf", "int8", "int4")  # nf4 and none read every tensor as floats
    with path.open("rb") as f:
        for info in gguf.tensors:
            found = to_hf_name("llama", info.name)
            if found is None or found[0] not in filler.shapes:
                continue  # a tensor the model has no place for (rope_freqs)
            key, rule = found
            raw = read_rows(f, info)
            module_name, _, leaf = key.rpartition(".")
            if keep_blocks and leaf == "weight" and ggml.packable(info.ggml_type):
                rows = to_transformers_layout(raw, rule, heads, kv_heads)  # exact on packed rows
                filler.put_blocks(
                    module_name, ggml.pack(rows, info.ggml_type), ggml.type_name(info.ggml_type)
                )
            else:
                filler.put(key, to_transformers_layout(dense(raw, info), rule, heads, kv_heads))


def _assign(module: nn.Module, leaf: str, tensor: Tensor) -> None:
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise CannotFill(f"`{leaf}` of {type(module).__name__} is neither a parameter nor a buffer")


def _holds_meta(module: nn.Module, recurse: bool) -> bool:
    return any(t.is_meta for t in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)])


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)
