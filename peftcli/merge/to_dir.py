"""`peft merge`: fold a trained adapter into the base weights and write a plain transformers model dir.

Two ways to the same files:

- **Streaming**, for a local safetensors base (one file, or shards listed in model.safetensors.index.json)
  and the methods that fold into the weights: each adapted layer's weight becomes the method's
  ``fold(layer, weight)`` (LoRA: W + scale * B @ A) and every other adapter tensor (BitFit's biases,
  ``modules_to_save``) replaces the base one. Each base tensor is read from its shard, changed if the
  adapter touches it, cast and appended to the output shard; nothing else is held (stream.py). Peak memory
  is the largest tensor (a few copies of it while it is merged) plus the adapter, whatever the model's size.
- **In memory**, for everything else (a GGUF or hub base, a checkpoint whose tensor names transformers
  converts on load, a run that trained on quantized weights): load base + adapter as the run trained them,
  dequantize any quantized layers (the weights the adapter was trained against, not a re-read original),
  the method's ``merge(model)``, ``save_pretrained``.

Then the check (check.py). Both models are never in memory at once: base + adapter give the reference
logits and are freed before the merged model is loaded. The check still loads the model once in float32;
``verify=False`` skips it.

Nothing appears at ``output`` unless every step passed: the files are written to a temp dir next to it,
which is renamed at the very end.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor, nn

from peftcli.errors import UserError
from peftcli.fileio import disk_errors, make_readable
from peftcli.merge.check import check_merged, logits_of, probe_batch
from peftcli.merge.stream import stream_plan, write_streamed
from peftcli.models.load import classification_config, load_config, precision_of
from peftcli.models.shards import safetensors_shards
from peftcli.quant.convert import dequantize_model
from peftcli.runs import lock
from peftcli.runs.adapter import AdapterDir

OUTPUT_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class MergeResult:
    output: Path
    method: str  # peftcli method name, e.g. lora
    base: str
    streamed: bool  # True: shard by shard; False: loaded in memory
    dtype: torch.dtype  # of the written weights
    max_abs_diff: float | None  # the check's max |logit difference|; None when not verified
    tolerance: float | None
    seconds: float


def merge_to_dir(
    adapter_dir: str | Path,
    output: str | Path,
    base: str | None = None,
    dtype: str | None = None,
    console: Console | None = None,
    *,
    verify: bool = True,
    max_shard_size: str = "5GB",
) -> MergeResult:
    """Merge the adapter in `adapter_dir` into its base model and write the result to `output` (new).

    `dtype`: fp32 | bf16 | fp16 (default: the base's). `max_shard_size` applies to the in-memory path;
    streaming keeps the base's shards.
    """
    started = time.perf_counter()
    console = console or Console()
    say = lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    output = Path(output).expanduser()
    if output.exists() or output.is_symlink():
        raise UserError(f"--output {output} already exists: peft merge never overwrites; choose a new path")
    out_dtype = _parse_dtype(dtype)
    adapter = AdapterDir(Path(adapter_dir).expanduser(), base)
    check_mergeable(adapter)
    with lock.hold(adapter.path, "peft merge"):  # no run rewrites the adapter while it is read
        plan = None
        trained_on = precision_of(adapter.base_source, *adapter.precision()).quantize
        if trained_on != "none":
            say(QUANTIZED_NOTE.format(storage=_storage_name(trained_on)))
        shards = safetensors_shards(adapter.base_source) if trained_on == "none" else None
        if shards:
            plan, reason = stream_plan(adapter, _base_config(adapter), shards, Path(adapter.base_source.path))
            if plan is None:
                say(f"note: loading the whole base model instead of streaming it: {reason}")
        out_dtype = out_dtype or (plan.base_dtype if plan else _config_dtype(adapter))
        how = f"{'streamed tensor by tensor' if plan else 'loaded in memory'}, {_dtype_name(out_dtype)}"
        say(f"merge: {adapter.method.name} adapter {adapter.path} into {adapter.base} ({how})")

        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
        try:
            with disk_errors(f"the merged model to {output}"):
                diff, tolerance = _write(adapter, plan, tmp, out_dtype, verify, max_shard_size, say)
            make_readable(tmp)  # a model dir, not a private temp dir
            if output.exists() or output.is_symlink():
                raise UserError(f"--output {output} appeared while merging: left untouched")
            os.rename(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    say(f"done: merged model ({size / 1e6:,.1f} MB of weights) in {output}")
    seconds = time.perf_counter() - started
    return MergeResult(
        output, adapter.method.name, adapter.base, plan is not None, out_dtype, diff, tolerance, seconds
    )


def _write(
    adapter: AdapterDir, plan, directory: Path, out_dtype: torch.dtype, verify: bool, max_shard_size: str, say
) -> tuple[float | None, float | None]:
    """The merged model, its tokenizer and (with `verify`) the check, into `directory`; returns the check's
    (max |logit difference|, tolerance), or (None, None) when not verified."""
    if plan:
        write_streamed(plan, directory, out_dtype)
        probe = probe_batch(plan.config)
        reference = _reference_logits(adapter, probe) if verify else None
    else:
        # The base as the run trained on it (quantized, if it was), computed in the check's precision.
        model = adapter.load_model(dtype="float32")
        probe = probe_batch(model.config)
        reference = logits_of(model, probe) if verify else None
        model = merge_in_memory(adapter, model)
        model.to(out_dtype).save_pretrained(directory, max_shard_size=max_shard_size)
        del model
        gc.collect()
    _save_tokenizer(adapter, directory, say)
    if reference is None:
        say("check: skipped")
        return None, None
    diff, tolerance = check_merged(directory, adapter.task, probe, reference, out_dtype)
    say(
        f"check: max |logit difference| vs base + adapter as trained = {diff:.2e} "
        f"(tolerance {tolerance:.1e}): ok"
    )
    return diff, tolerance


def check_mergeable(adapter: AdapterDir) -> None:
    """Refuse, before anything is loaded, a method that does not fold into the weights."""
    if not getattr(adapter.module, "MERGEABLE", False):
        why = getattr(adapter.module, "WHY_NOT_MERGEABLE", "the method does not fold into the weights")
        raise UserError(f"cannot merge {adapter.path}, a {adapter.config['peft_type']} adapter: {why}")


def merge_in_memory(adapter: AdapterDir, model: nn.Module | None = None) -> nn.Module:
    """Base + adapter (`model`, else loaded computing in float32) with the adapter folded in: the plain
    transformers model, its head untied from the embedding where the adapter trained one of them in full.
    A quantized base (the run's model.quantize, a GGUF file's blocks) is dequantized first: the adapter
    folds into the weights it was trained against."""
    if model is None:
        model = adapter.load_model(dtype="float32")
    model = adapter.module.merge(dequantize_model(model, torch.float32))
    _untie_split_embeddings(model)
    return model


QUANTIZED_NOTE = (
    "note: the run trained on {storage} weights: the adapter is folded into those weights dequantized (what "
    "it was trained against, not the original file's), and the check compares with base + adapter as trained"
)


def _storage_name(quantize: str) -> str:
    return "the GGUF file's quantized" if quantize == "gguf" else quantize


def _parse_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in OUTPUT_DTYPES:
        raise UserError(f"--dtype: unknown dtype {dtype!r}; choose fp32, bf16 or fp16")
    return OUTPUT_DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _base_config(adapter: AdapterDir):
    """The base's transformers config, for the adapter's task (and labels)."""
    try:
        config = load_config(adapter.base_source, revision=adapter.revision)
    except UserError as e:
        raise adapter.base_error(e) from e
    if adapter.task == "sequence-classification":
        config = classification_config(config, adapter.num_labels, adapter.label_names)
    return config


def _config_dtype(adapter: AdapterDir) -> torch.dtype:
    """The base's dtype as its config states it; float32 when it states none (GGUF: dequantized)."""
    config = _base_config(adapter)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _untie_split_embeddings(model: nn.Module) -> None:
    """A head or embedding trained in full (modules_to_save) no longer shares the other's weight: the
    config must say so, or loading ties them again."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is inputs.weight:
        return
    config = model.config
    if getattr(config.get_text_config(), "tie_word_embeddings", False) or config.tie_word_embeddings:
        config.get_text_config().tie_word_embeddings = False
        config.tie_word_embeddings = False


def _save_tokenizer(adapter: AdapterDir, directory: Path, say) -> None:
    """The run's tokenizer (a `peft train` output dir has it), else the base's; chat template included."""
    try:
        tokenizer = adapter.load_tokenizer()
    except UserError as e:
        if adapter.has_tokenizer:
            raise
        say(f"note: the merged model has no tokenizer files: {e}")
        return
    tokenizer.save_pretrained(str(directory))


def _reference_logits(adapter: AdapterDir, probe: dict[str, Tensor]) -> Tensor:
    model = adapter.load_model(dtype="float32")
    reference = logits_of(model, probe)
    del model
    gc.collect()
    return reference
