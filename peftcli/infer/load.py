"""Load a run (or a bare adapter dir) for inference: the base model once, the adapter on it, eval mode.

With ``fold=True`` (what generate and chat use) a method that folds into the weights (LoRA, BitFit) is
merged in memory (the method's own ``merge``, the one `peft merge` uses), so decoding runs a plain model at
its own speed; where it cannot fold (prefix/prompt tuning, adapters, a LoRA on a tied weight) the model keeps
the method's layers. A causal LM on a llama base on disk is built as llama.py's Decoder (`plain_decoder`:
the same math without importing transformers' modeling code, seconds sooner to the first token), anything
else by transformers; with the Decoder, the run's saved tokenizer is read by tokenizer.py (transformers'
own tokenizer where that does not apply), so nothing imports transformers at all. No training-time
machinery is involved: no activation checkpointing, no fast-path kernels, no gradients.

The adapter dir is a `peft train` output dir (adapter files, tokenizer, recipe.yaml, labels.json at its
root) or a bare adapter dir, ours or HF PEFT's (no tokenizer: the base model's is used).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftcli.errors import UserError
from peftcli.infer.llama import Decoder
from peftcli.infer.tokenizer import load_saved
from peftcli.models.gguf_header import GGUFError
from peftcli.runs.adapter import AdapterDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceInfo:
    run_dir: Path
    base: str  # the base model as loaded (--base or the adapter's base_model_name_or_path)
    task: str  # causal-lm | sequence-classification
    method: str  # the peftcli method name, e.g. lora
    label_names: list[str] | None  # classification labels in id order, when the run saved them
    data_format: str | None  # recipe.yaml's data.format; None for a bare adapter dir
    max_length: int | None  # recipe.yaml's data.max_length: longer text to classify is truncated
    device: torch.device
    folded: bool = False  # the adapter was merged into the weights


def load_for_inference(
    run_dir: str | Path, base: str | None = None, fold: bool = False
) -> tuple[nn.Module, object, InferenceInfo]:
    """(model with the adapter loaded (merged where `fold` and the method allows), in eval mode; tokenizer;
    InferenceInfo)."""
    return load_adapter_dir(AdapterDir(run_dir, base), fold)


def load_adapter_dir(adapter: AdapterDir, fold: bool = False) -> tuple[nn.Module, object, InferenceInfo]:
    recipe = adapter.recipe
    model, folded = plain_decoder(adapter) if fold else (None, False)
    if model is None:
        model = adapter.load_model()  # the run's dtype and quantization, as trained
    if fold and not folded and getattr(adapter.module, "MERGEABLE", False):
        model = dense_if_room(model)
        try:
            model = adapter.module.merge(model)  # checks everything before changing anything
            folded = True
        except UserError as e:  # e.g. a LoRA on a tied embedding: decode through the method's layers
            log.debug("not folded: %s", e)
    tokenizer = _plain_tokenizer(adapter) if isinstance(model, Decoder) else None
    tokenizer = tokenizer or adapter.load_tokenizer()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    info = InferenceInfo(
        run_dir=adapter.path,
        base=adapter.base,
        task=adapter.task,
        method=adapter.method.name,
        label_names=adapter.label_names,
        data_format=recipe.data.format if recipe else None,
        max_length=recipe.data.max_length if recipe else _tokenizer_limit(tokenizer),
        device=device,
        folded=folded,
    )
    return model, tokenizer, info


def plain_decoder(adapter: AdapterDir) -> tuple[nn.Module | None, bool]:
    """(the run's causal LM as llama.py's Decoder with the adapter in it, whether the adapter is folded in
    already) where that applies: a llama base on disk (a GGUF file or a safetensors dir) that the run held
    dense or as the file's own blocks (dense here: the same values), a method that folds into the weights,
    and room for the dense weights (half the memory available). Else (None, False): transformers builds the
    model. A plain LoRA is folded straight from its tensors (lora.fold_state: merge's arithmetic, without
    wrapping 200 layers first); anything else is injected for the caller to merge."""
    from peftcli.infer import llama
    from peftcli.methods import lora
    from peftcli.models import precision
    from peftcli.runs.adapter import apply_adapter

    if adapter.task != "causal-lm" or not getattr(adapter.module, "MERGEABLE", False):
        return None, False
    source = adapter.base_source
    chosen = precision.resolve(*adapter.precision(), gguf=bool(source.gguf_file))
    if chosen.quantize not in ("none", "gguf"):  # int8/int4/nf4: the adapter trained on rounded weights
        return None, False
    try:
        base = llama.load(source, getattr(torch, chosen.dtype), _dense_budget())
    except (UserError, GGUFError, OSError) as e:  # transformers' path loads it again and says what is wrong
        log.debug("decoding with transformers: %s", e)
        return None, False
    if base is None:
        return None, False
    if adapter.module is lora and fold_lora(base, adapter.method, adapter.state):
        return base, True
    return apply_adapter(base, adapter.module, adapter.method, adapter.task, adapter.state).eval(), False


def fold_lora(model: nn.Module, config, state: dict[str, torch.Tensor]) -> bool:
    """Fold a saved LoRA (`config`: its lora.Config; `state`: the adapter file's tensors) into `model`'s
    linear layers in place, without wrapping them first: `lora.fold_weight` on each, the arithmetic of
    LoRA's merge, so the weights come out as inject, load and merge leave them, in a third of the time.

    False, having changed nothing, where this shortcut does not apply: PiSSA/OLoRA factors, modules trained
    in full, a target that is not a plain nn.Linear or whose weight is tied, keys or shapes other than the
    config's. The caller then takes the long way, which also says what is wrong."""
    from peftcli.methods import lora, lora_init
    from peftcli.methods.modules import KEY_PREFIX, tied_parameters

    if lora_init.from_base(config.init):
        return False
    leaves = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if config.use_dora else ())
    names = {key.removeprefix(KEY_PREFIX).rsplit(".lora_", 1)[0] for key in state}
    if set(state) != {f"{KEY_PREFIX}{name}.{leaf}" for name in names for leaf in leaves}:
        return False
    tied, folds = tied_parameters(model), []
    for name in sorted(names):
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            return False
        A, B, *magnitude = (state[f"{KEY_PREFIX}{name}.{leaf}"] for leaf in leaves)
        if not isinstance(layer, nn.Linear) or id(layer.weight) in tied:
            return False
        if A.shape != (config.rank, layer.in_features) or B.shape != (layer.out_features, config.rank):
            return False
        folds.append((layer.weight, A, B, magnitude[0] if magnitude else None))
    scale = lora.scaling(config.rank, config.alpha, config.use_rslora)
    with torch.no_grad():
        for weight, A, B, magnitude in folds:
            weight.copy_(lora.fold_weight(weight, A, B, scale, False, magnitude))
    return True


def _plain_tokenizer(adapter: AdapterDir):
    """The run's saved tokenizer read without transformers (tokenizer.py), where it applies; else None."""
    return load_saved(adapter.path) if adapter.has_tokenizer else None


def dense_if_room(model: nn.Module) -> nn.Module:
    """A quantized base (a GGUF file's packed blocks, model.quantize) dequantized for decoding where its dense
    copy takes at most half the memory available: a packed product dequantizes its weight on every call, so
    each generated token would dequantize the whole model again (on the quickstart run 2.8 tokens/s against
    9.4 dense), and a dense base takes the adapter folded in. Else the model stays packed, with a note."""
    from peftcli.quant import convert

    numel = convert.quantized_numel(model)
    if not numel:
        return model
    dtype = next(m.compute_dtype for m in model.modules() if hasattr(m, "compute_dtype"))
    need, budget = numel * dtype.itemsize, _dense_budget()
    if budget is not None and need > budget:
        log.warning(
            "decoding on the quantized weights, which is slower: their dense copy (%.1f GiB) would take "
            "more than half the memory available (%.1f GiB)",
            need / 2**30,
            2 * budget / 2**30,
        )
        return model
    return convert.dequantize_model(model, dtype)


def _dense_budget() -> int | None:
    """Bytes that dense weights for decoding may take: half the memory available (None: not known)."""
    room = _available_bytes()
    return None if room is None else room // 2


def _available_bytes() -> int | None:
    """Memory free for a dense copy: the RAM available and, with CUDA, at most the GPU's free memory."""
    room = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0]
        room = free if room is None else min(room, free)
    return room


def _tokenizer_limit(tokenizer) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None  # else: transformers' "no limit"
