"""`peft merge`: fold a trained adapter into the base weights and write a plain transformers model dir.

Two ways to the same files:

- **Streaming**, for a local safetensors base (one file, or shards listed in model.safetensors.index.json)
  and the methods whose merge rewrites base tensors one at a time: LoRA (W + scale * B @ A), BitFit and
  ``modules_to_save`` (a trained tensor replaces the base one). Each base tensor is read from its shard,
  changed if the adapter touches it, cast and appended to the output shard; nothing else is held. Peak
  memory is the largest tensor (a few copies of it while it is merged) plus the adapter, whatever the
  model's size.
- **In memory**, for everything else (a GGUF or hub base, a checkpoint whose tensor names transformers
  converts on load): load base + adapter, the method's ``merge(model)``, ``save_pretrained``.

Then the check: the written dir is loaded with plain transformers and its logits on a fixed probe batch
are compared with base + adapter's, both computed in float32. The tolerance is relative to the logit
scale, ``max(1, max |reference logit|)``: 1e-4 of it for float32 output, 5e-2 for bfloat16 / float16.

- float32: the folded weights differ from the unfolded computation only by rounding, which grows with
  depth and logit size: ~4e-7 on the tiny test models; 5.9e-5 (q/v adapter) and 1.2e-4 (all-linear,
  rank 16) on SmolLM2-135M, whose logits reach ~30. A fixed 1e-4 would fail correct merges of real models;
  1e-4 of the scale (3e-3 there) still fails a delta that is missing, transposed or mis-scaled.
- bfloat16 / float16: rounding every weight to 8 (bf16) or 11 (fp16) significant bits moves logits by a
  fraction of a percent of their scale per layer (~1% on the tiny models); 5% leaves room for depth. In
  half precision the check catches structural faults (a tensor missing, transposed or misplaced), not a
  delta that is a little off: the float32 path pins that.

Both models are never in memory at once: base + adapter give the reference logits and are freed before the
merged model is loaded. The check still loads the model once in float32; ``verify=False`` skips it.

Nothing appears at ``output`` unless every step passed: the files are written to a temp dir next to it,
which is renamed at the very end.

This module is the orchestration, the in-memory path, the tokenizer output and the check; the streaming
plan and writer live in `peftcli.merge_stream`.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from rich.console import Console
from torch import Tensor, nn

from peftcli import checkpoint, models, sources
from peftcli.errors import CheckFailed, UserError
from peftcli.generate import TOKENIZER_FILES, num_labels_from_head
from peftcli.merge_stream import GENERATION_CONFIG as GENERATION_CONFIG  # re-exported: part of the API
from peftcli.merge_stream import INDEX_NAME, SINGLE_NAME, stream_plan, write_streamed
from peftcli.methods import bitfit, lora
from peftcli.recipe import MethodSection

OUTPUT_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
# Methods whose merge is "each base tensor -> its new value": what streaming knows how to do.
STREAMABLE: tuple[ModuleType, ...] = (lora, bitfit)
# The check's tolerances, times max(1, max |reference logit|) (module docstring).
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
PROBE_SHAPE = (2, 16)  # (sequences, tokens) of the check's fixed random token ids


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


@dataclass(frozen=True)
class _Job:
    """What the adapter dir says, read once."""

    adapter_dir: Path
    base: str  # --base or the adapter's base_model_name_or_path
    where: str  # where `base` came from, for messages
    task: str
    module: ModuleType  # the method's module
    method: MethodSection
    state: dict[str, Tensor]
    label_names: list[str] | None
    num_labels: int | None
    revision: str | None


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
    output = Path(output)
    if output.exists() or output.is_symlink():
        raise UserError(f"--output {output} already exists: peft merge never overwrites; choose a new path")
    out_dtype = _parse_dtype(dtype)
    job = _read_job(Path(adapter_dir), base)
    source = _resolve_base(job)
    plan = None
    if job.module in STREAMABLE:
        shards = _safetensors_shards(source)
        if shards:
            plan, reason = stream_plan(job, _base_config(job, source), shards, Path(source.path))
            if plan is None:
                say(f"note: loading the whole base model instead of streaming it: {reason}")
    out_dtype = out_dtype or (plan.base_dtype if plan else _config_dtype(job, source))
    how = f"{'streamed tensor by tensor' if plan else 'loaded in memory'}, {_dtype_name(out_dtype)}"
    say(f"merge: {job.method.name} adapter {job.adapter_dir} into {job.base} ({how})")

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        if plan:
            write_streamed(plan, tmp, out_dtype)
            probe = probe_batch(plan.config)
            reference = _reference_logits(job, probe) if verify else None
        else:
            model = _load_with_adapter(job)
            probe = probe_batch(model.config)
            reference = logits_of(model, probe) if verify else None
            model = job.module.merge(model)
            _untie_split_embeddings(model)
            model.to(out_dtype).save_pretrained(tmp, max_shard_size=max_shard_size)
            del model
            gc.collect()
        _save_tokenizer(job, tmp, say)
        diff = tolerance = None
        if reference is not None:
            diff, tolerance = _check(tmp, job.task, probe, reference, out_dtype)
            say(
                f"check: max |logit difference| vs base + adapter = {diff:.2e} "
                f"(tolerance {tolerance:.1e}): ok"
            )
        else:
            say("check: skipped")
        if output.exists() or output.is_symlink():
            raise UserError(f"--output {output} appeared while merging: left untouched")
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    say(f"done: merged model ({size / 1e6:,.1f} MB of weights) in {output}")
    return MergeResult(
        output,
        job.method.name,
        job.base,
        plan is not None,
        out_dtype,
        diff,
        tolerance,
        time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------------
# Reading the adapter and finding the base


def _parse_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in OUTPUT_DTYPES:
        raise UserError(f"--dtype: unknown dtype {dtype!r}; choose fp32, bf16 or fp16")
    return OUTPUT_DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_job(adapter_dir: Path, base: str | None) -> _Job:
    config, state = checkpoint.read_adapter(adapter_dir)
    module = checkpoint.method_module(config, str(adapter_dir / checkpoint.CONFIG_NAME))
    if not getattr(module, "MERGEABLE", False):
        why = getattr(module, "WHY_NOT_MERGEABLE", "the method does not fold into the weights")
        raise UserError(f"cannot merge {adapter_dir}, a {config['peft_type']} adapter: {why}")
    method = checkpoint.method_from_config(config, str(adapter_dir / checkpoint.CONFIG_NAME))
    task = checkpoint.task_of(config)
    base_name = base or config.get("base_model_name_or_path")
    if not base_name:
        raise UserError(
            f"{adapter_dir / checkpoint.CONFIG_NAME} names no base model "
            "(base_model_name_or_path is empty): pass --base MODEL"
        )
    classify = task == "sequence-classification"
    label_names = checkpoint.read_labels(adapter_dir) if classify else None
    return _Job(
        adapter_dir=adapter_dir,
        base=base_name,
        where="--base" if base else checkpoint.CONFIG_NAME,
        task=task,
        module=module,
        method=method,
        state=state,
        label_names=label_names,
        num_labels=num_labels_from_head(state) if classify and not label_names else None,
        revision=config.get("revision"),
    )


def _base_error(job: _Job, error: UserError) -> UserError:
    message = str(error).removeprefix("model.name: ")
    hint = "" if job.where == "--base" else "; pass --base MODEL to use another copy of the base model"
    return UserError(f"base model `{job.base}` (from {job.where}): {message}{hint}")


def _resolve_base(job: _Job) -> sources.ModelSource:
    try:
        return sources.resolve(job.base)
    except UserError as e:
        raise _base_error(job, e) from e


def _base_config(job: _Job, source: sources.ModelSource):
    try:
        config = models.load_config(source, revision=job.revision)
    except UserError as e:
        raise _base_error(job, e) from e
    if job.task == "sequence-classification":
        config = models.classification_config(config, job.num_labels, job.label_names)
    return config


def _config_dtype(job: _Job, source: sources.ModelSource) -> torch.dtype:
    """The base's dtype as its config states it; float32 when it states none (GGUF: dequantized)."""
    config = _base_config(job, source)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _load_with_adapter(job: _Job) -> nn.Module:
    """Base + adapter, in float32 (the check's reference precision), eval mode, on the CPU."""
    try:
        model = models.load_model(
            job.base,
            job.task,
            label_names=job.label_names,
            num_labels=job.num_labels,
            dtype="float32",
            revision=job.revision,
        )
    except UserError as e:
        raise _base_error(job, e) from e
    model = checkpoint.apply_adapter(model, job.module, job.method, job.task, job.state)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Which base streams: kept here, not in merge_stream, because tests and scripts/bench_merge.py patch
# `merge._safetensors_shards` to force the in-memory path.


def _safetensors_shards(source: sources.ModelSource) -> list[Path] | None:
    """The base's safetensors files, when it is a local dir that has them."""
    if not source.is_local or source.gguf_file:
        return None
    root = Path(source.path)
    if (root / INDEX_NAME).is_file():
        try:
            weight_map = json.loads((root / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise UserError(f"{root / INDEX_NAME}: not a valid safetensors index ({e})") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise UserError(f"base model {source.name}: shard {missing[0]} listed in {INDEX_NAME} is missing")
        return [root / n for n in names]
    return [root / SINGLE_NAME] if (root / SINGLE_NAME).is_file() else None


# --------------------------------------------------------------------------------------------------
# The in-memory path's tied embeddings, the tokenizer, and the check


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


def _save_tokenizer(job: _Job, directory: Path, say) -> None:
    """The run's tokenizer (a `peft train` output dir has it), else the base's; chat template included."""
    if any((job.adapter_dir / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(job.adapter_dir))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the tokenizer saved in {job.adapter_dir}: {e}") from e
    else:
        try:
            tokenizer = models.load_tokenizer(job.base, revision=job.revision)
        except UserError as e:
            say(f"note: the merged model has no tokenizer files: {e}")
            return
    tokenizer.save_pretrained(str(directory))


def probe_batch(config) -> dict[str, Tensor]:
    """Fixed pseudo-random token ids (no padding) for the check: the same for every run of a model."""
    text = config.get_text_config()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, text.vocab_size, PROBE_SHAPE, generator=generator)
    pad = getattr(text, "pad_token_id", None)
    if isinstance(pad, int):
        ids[ids == pad] = (pad + 1) % text.vocab_size  # a pad id would change where a classifier pools
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def logits_of(model: nn.Module, probe: dict[str, Tensor]) -> Tensor:
    return model(**probe).logits.float()


def _reference_logits(job: _Job, probe: dict[str, Tensor]) -> Tensor:
    model = _load_with_adapter(job)
    reference = logits_of(model, probe)
    del model
    gc.collect()
    return reference


def _check(
    directory: Path, task: str, probe: dict, reference: Tensor, out_dtype: torch.dtype
) -> tuple[float, float]:
    """Load the written dir with plain transformers; (max |logit difference|, tolerance) or CheckFailed."""
    cls = models.auto_class(task)
    try:
        model, info = cls.from_pretrained(str(directory), dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckFailed(f"the merged model does not load with transformers: {e}") from e
    bad = sorted(info.get("missing_keys", ())) + sorted(info.get("mismatched_keys", ()))
    if bad:
        raise CheckFailed(f"the merged model loads with tensors missing or misshaped (e.g. {bad[0]})")
    merged = logits_of(model.eval(), probe)
    del model
    gc.collect()
    diff = float((merged - reference).abs().max())
    tolerance = TOLERANCES[out_dtype] * max(1.0, float(reference.abs().max()))
    if not diff <= tolerance:  # `not <=`: a NaN fails too
        raise CheckFailed(
            f"the merged model's logits differ from base + adapter by {diff:.3g} "
            f"(tolerance {tolerance:.1e}): nothing written"
        )
    return diff, tolerance
