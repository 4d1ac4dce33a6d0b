"""`peft export RUN_DIR --gguf OUT.gguf`: the run as one GGUF file (or, with ``--adapter-only``, its LoRA as
a llama.cpp adapter file), checked by llama.cpp before it appears at OUT.

Every refusal (an architecture or method llama.cpp cannot run, an existing OUT) comes before anything is
loaded. Then: base + adapter loaded once in float32, the adapter folded in (the merge's in-memory path),
peftcli's greedy continuations of the probe prompts taken, the file written to a temp file beside OUT, the
model freed, and llama.cpp loads the file and answers the same probes (verify.py). Only when that check
passes is the temp file renamed to OUT; on any failure nothing is left behind (exit 1 for a failed check).
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from peftcli.errors import CheckFailed, UserError
from peftcli.export import quant as quants
from peftcli.export.adapter import adapter_metadata, adapter_tensors, check_adapter_only
from peftcli.export.arch import check_exportable, hparams
from peftcli.export.gguf import model_metadata, model_tensors, write_gguf
from peftcli.export.ollama import write_modelfile
from peftcli.export.tokenizer import tokenizer_metadata
from peftcli.export.verify import PROBES, Verification, check_with_llamacpp, reference_continuations
from peftcli.infer.prompt import prompt_style, stop_ids
from peftcli.merge.to_dir import check_mergeable, merge_in_memory
from peftcli.models.gguf_header import GGUFFile, read_gguf
from peftcli.models.gguf_names import from_llamacpp_rotary, rotary_heads, to_gguf_name
from peftcli.models.load import load_config
from peftcli.runs import lock
from peftcli.runs.adapter import AdapterDir, apply_adapter


@dataclass(frozen=True)
class ExportResult:
    output: Path
    adapter_only: bool
    verification: Verification | None
    modelfile: Path | None
    seconds: float


@dataclass
class _Job:
    """What one export works with, resolved before anything heavy happens."""

    adapter: AdapterDir
    output: Path
    arch: str
    quant: int | None
    base_path: str | None  # the base GGUF file, where the base is one
    base_gguf: GGUFFile | None


def export_run(
    run_dir: str | Path,
    output: str | Path,
    quant: str | None = None,
    adapter_only: bool = False,
    ollama: str | Path | None = None,
    base: str | None = None,
    verify: bool = True,
    probes: tuple[str, ...] = PROBES,
    console: Console | None = None,
) -> ExportResult:
    started = time.perf_counter()
    console = console or Console()
    say = lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    job = _prepare(AdapterDir(Path(run_dir).expanduser(), base), Path(output), quant, adapter_only, ollama)
    with lock.hold(job.adapter.path, "peft export"):  # no run rewrites the adapter while it is read
        kind = "LoRA adapter" if adapter_only else "merged model"
        say(f"export: {job.adapter.method.name} run {job.adapter.path} as a llama.cpp `{job.arch}` {kind}")
        try:
            fd, tmp_name = tempfile.mkstemp(
                prefix=f".{job.output.name}.", suffix=".tmp", dir=job.output.parent
            )
        except OSError as e:
            raise UserError(f"--gguf {job.output}: cannot write in {job.output.parent} ({e.strerror})") from e
        os.close(fd)
        tmp = Path(tmp_name)
        temp_base = tmp.with_name(tmp.name + ".base.gguf")  # written only for an adapter on a non-GGUF base
        try:
            tokenizer, probe_set, chat = _write(job, tmp, temp_base, adapter_only, verify, probes, say)
            verification = None
            if verify:
                verification = _check(job, tmp, temp_base, probe_set, chat, adapter_only, say)
            else:
                say("check: skipped")
            if job.output.exists():
                raise UserError(f"--gguf {job.output} appeared while exporting: left untouched")
            os.replace(tmp, job.output)
        except OSError as e:  # a full disk, a directory that went away: said in one line, nothing left behind
            raise UserError(f"export to {job.output} failed: {e}") from e
        finally:
            tmp.unlink(missing_ok=True)
            temp_base.unlink(missing_ok=True)
        modelfile = None
        if ollama is not None:
            base_file = Path(job.base_path) if adapter_only else job.output
            adapter_file = job.output if adapter_only else None
            modelfile = write_modelfile(Path(ollama), base_file, tokenizer, adapter_file)
            say(f"ollama: {modelfile} (ollama create NAME -f {modelfile})")
        size = job.output.stat().st_size / 1e6
        say(f"done: {job.output} ({size:,.1f} MB)")
        return ExportResult(job.output, adapter_only, verification, modelfile, time.perf_counter() - started)


def _prepare(adapter: AdapterDir, output: Path, quant: str | None, adapter_only: bool, ollama) -> _Job:
    """Every refusal that needs no weights: the output path, the method, the architecture, the type."""
    if output.exists() or output.is_symlink():
        raise UserError(f"--gguf {output} already exists: peft export never overwrites; choose a new path")
    if output.is_dir() or not output.parent.is_dir():
        raise UserError(f"--gguf {output}: its directory {output.parent} does not exist")
    quant_type = quants.parse_quant(quant)
    if adapter_only:
        check_adapter_only(adapter, quant_type)
    else:
        check_mergeable(adapter)
    try:
        config = load_config(adapter.base_source, revision=adapter.revision)
    except UserError as e:
        raise adapter.base_error(e) from e
    arch = check_exportable(config, adapter.task)
    source = adapter.base_source
    base_path = f"{source.path}/{source.gguf_file}" if source.gguf_file else None
    if ollama is not None and Path(ollama).exists() and not Path(ollama).is_dir():
        raise UserError(f"--ollama {ollama} is a file, not a directory for the Modelfile")
    if ollama is not None and adapter_only and base_path is None:
        raise UserError(
            "--ollama with --adapter-only needs a GGUF base for FROM; this run's base is not one "
            "(export the merged model for Ollama instead)"
        )
    base_gguf = read_gguf(base_path, arrays=True) if base_path else None
    return _Job(adapter, output, arch, quant_type, base_path, base_gguf)


def _write(job: _Job, tmp: Path, temp_base: Path, adapter_only: bool, verify: bool, probes, say):
    """Load, fold, take the reference continuations, write `tmp` (and, for an adapter checked on a base
    that is no GGUF, the base as `temp_base`); returns (tokenizer, probes, whether they are chat prompts)."""
    adapter, recipe = job.adapter, job.adapter.recipe
    tokenizer = adapter.load_tokenizer()
    base_model = adapter.load_base(dtype="float32")
    if adapter_only and verify and job.base_path is None:  # llama.cpp needs the base as GGUF too
        say("check: writing the base as a temporary f32 GGUF to apply the adapter to")
        _write_merged(job, temp_base, base_model, tokenizer, quants.F32, changed=set())
    model = apply_adapter(base_model, adapter.module, adapter.method, adapter.task, adapter.state).eval()
    if adapter_only:
        base_names = {t.name for t in job.base_gguf.tensors} if job.base_gguf else None
        tensors, alpha = adapter_tensors(model, job.arch, job.quant, base_names)
        write_gguf(tmp, job.arch, adapter_metadata(job.arch, _name(adapter), alpha), tensors)
        model = merge_in_memory(adapter, model)
    else:
        model = merge_in_memory(adapter, model)
        changed = _changed(model, job) if job.base_gguf is not None and job.quant is None else set()
        tensors = _write_merged(job, tmp, model, tokenizer, job.quant, changed)
        _say_raised(job, tensors, say)
    style = prompt_style(tokenizer, recipe.data.format if recipe else None, raw=False)
    probe_set = None
    if verify:
        probe_set = reference_continuations(
            model, tokenizer, style, probes, stop_ids(tokenizer, style), "cpu"
        )
    del model, base_model
    gc.collect()
    return tokenizer, probe_set, style == "chat"


def _say_raised(job: _Job, tensors, say) -> None:
    """Say which adapted tensors the default export wrote finer than the base has them (quant.py)."""
    if job.base_gguf is None or job.quant is not None:
        return
    raised = {}
    for t in tensors:
        base = job.base_gguf.tensor(t.name)
        if base is not None and base.ggml_type != t.ggml_type:
            raised.setdefault((base.ggml_type, t.ggml_type), []).append(t.name)
    for (was, now), names in raised.items():
        say(
            f"note: {len(names)} adapted tensors written {quants.type_name(now)}, not the base's "
            f"{quants.type_name(was)}: requantized to it, the adapter's change would round away "
            "(--quant sets one type for all)"
        )


def _write_merged(job: _Job, path: Path, model, tokenizer, quant_type: int | None, changed: set[str]):
    """Write the merged `model` to `path`; returns the tensors as planned (names and types)."""
    base = job.base_gguf if quant_type is None else None
    tensors = model_tensors(model, job.arch, quant_type, base, job.base_path, changed)
    config = model.config
    keys = tokenizer_metadata(tokenizer, config.get_text_config().vocab_size, job.base_gguf)
    if quant_type is not None:
        file_type = quants.FILE_TYPES[quants.type_name(quant_type)]
    else:
        file_type = (
            job.base_gguf.metadata.get("general.file_type") if job.base_gguf else quants.FILE_TYPES["f16"]
        )
    quantized = any(t.ggml_type not in (quants.F32, quants.F16) for t in tensors)
    write_gguf(
        path,
        job.arch,
        model_metadata(config, job.arch, _name(job.adapter), keys, file_type, quantized),
        tensors,
    )
    return tensors


def _changed(model, job: _Job) -> set[str]:
    """The merged model's parameters that differ from the GGUF base's tensors (compared exactly: the base
    loads bit for bit, so an untouched tensor is equal)."""
    import numpy as np
    import torch

    from peftcli.models.gguf_load import dequantize

    hp = hparams(model.config.get_text_config(), job.arch)
    blob = np.memmap(job.base_path, dtype=np.uint8, mode="r")
    changed = set()
    for name, param in model.named_parameters():
        gguf_name, rule = to_gguf_name(job.arch, name)
        info = job.base_gguf.tensor(gguf_name)
        if info is None:
            changed.add(name)
            continue
        base = dequantize(blob, info)
        base = base.T if rule.transposed else base
        if (heads := rotary_heads(rule, hp.heads, hp.kv_heads)) is not None:
            base = from_llamacpp_rotary(base, heads)
        if base.shape != param.shape or not torch.equal(base, param.detach().float()):
            changed.add(name)
    return changed


def _check(
    job: _Job, tmp: Path, temp_base: Path | None, probes, chat: bool, adapter_only: bool, say
) -> Verification:
    model_path, lora = tmp, None
    if adapter_only:
        model_path, lora = Path(job.base_path) if job.base_path else temp_base, tmp
    verification = check_with_llamacpp(model_path, probes, chat, lora)
    say(f"check: llama.cpp vs peftcli on {len(probes)} probe prompts: {verification.summary()}")
    for warning in verification.other_warnings:
        say(f"note: llama.cpp: {warning}")
    failure = verification.failure()
    if failure:
        hint = ""
        if not adapter_only and job.quant in (quants.QUANTS["q4_0"], quants.QUANTS["q4_1"]):
            hint = " (4 bits round away much of an adapter's change: try --quant q8_0, or --adapter-only)"
        raise CheckFailed(f"{failure}: nothing written{hint}")
    return verification


def _name(adapter: AdapterDir) -> str:
    return f"{Path(adapter.base).stem} + {adapter.path.resolve().name} ({adapter.method.name})"
