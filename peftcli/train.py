"""`peft train`: setup() builds everything, fit() is the loop, run() ties them to the output dir.

Batches are cut from a seeded permutation per epoch into *global* batches of
batch_size x processes x gradient_accumulation examples; each process takes its slice. The loss is a
sum over target tokens divided by the global batch's token count, so one process at batch size 8
and two processes at batch size 4 compute the same loss and the same update.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from peftcli import checkpoint, fileio, report, rundir, schedule
from peftcli.data import TokenizedDataset, check_data_source, collate, prepare_data
from peftcli.errors import UserError
from peftcli.lean import enable_lean_layers
from peftcli.loss import (
    causal_lm_loss_sum,
    chunked_causal_lm_loss_sum,
    classification_loss_sum,
    disable_chunked_loss,
    enable_chunked_loss,
)
from peftcli.methods import METHODS
from peftcli.methods.common import count_parameters
from peftcli.methods.lora import lora_layers
from peftcli.models import enable_activation_checkpointing, load_model, load_tokenizer
from peftcli.recipe import Recipe, TrainSection, dump_recipe
from peftcli.sources import portable_name


class TrainingStopped(UserError):
    """The run stopped before its end: non-finite loss (exit 1, last good adapter kept) or Ctrl-C (130)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Setup:
    recipe: Recipe
    accelerator: Accelerator
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    train_examples: TokenizedDataset
    eval_examples: TokenizedDataset | None
    pad_id: int
    label_names: list[str] | None
    head: torch.nn.Linear | None  # the frozen output head when the chunked loss is on
    total_steps: int
    output_dir: Path
    params: dict
    start_step: int = 0
    console: Console = field(default_factory=Console)


# --------------------------------------------------------------------------------------------------
# setup


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _inject(model, recipe: Recipe, tokenizer):
    if recipe.method.from_adapter:
        model, method = checkpoint.load_adapter(model, recipe.method.from_adapter)
        if method.name != recipe.method.name:
            raise UserError(
                f"method.from_adapter: {recipe.method.from_adapter} is a {method.name} adapter, "
                f"the recipe's method is {recipe.method.name}"
            )
        recipe.method = method
        return model
    inject = METHODS[recipe.method.name].inject
    if "tokenizer" in inspect.signature(inject).parameters:
        return inject(model, recipe.method, recipe.model.task, tokenizer=tokenizer)
    return inject(model, recipe.method, recipe.model.task)


def enable_step_paths(model, train: TrainSection, task: str) -> torch.nn.Linear | None:
    """The recipe's choices of how the step runs (same math): activation checkpointing (whole layers, the
    MLPs, or up's projection), the lean MLP and norm layers, the chunked loss. Returns the frozen output
    head when the chunked loss is on, else None."""
    mode = train.gradient_checkpointing
    if mode is True:
        enable_activation_checkpointing(model)
    if train.lean_layers:
        recompute = {"auto": "up", "up": "up", "mlp": "mlp"}.get(mode)  # true/false: None
        mlps, _ = enable_lean_layers(model, recompute=recompute)
        if mode in ("up", "mlp") and not mlps:
            raise UserError(
                f"train.gradient_checkpointing: {mode} recomputes parts of Llama-family SwiGLU MLPs "
                "and this model has none; use true to recompute whole layers"
            )
    return enable_chunked_loss(model) if train.chunked_loss and task == "causal-lm" else None


def _upcast_trainable(model, autocast: bool) -> None:
    """Keep what trains in fp32 on a half-precision base: a bf16 weight cannot hold AdamW's small updates
    (at lr 1e-4 most round away), and fp16 gradients cannot be unscaled. LoRA's forward takes fp32
    factors on any base; other trainable modules (heads, prompts, adapters) rely on autocast for that."""
    if autocast:
        params = list(model.parameters())
    else:
        params = [p for _, m in lora_layers(model) for p in (m.lora_A.weight, m.lora_B.weight)]
    for param in params:
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def _optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise UserError(f"method {recipe.method.name}: nothing to train on this model")
    # No weight decay on 1-D parameters (biases, norms, virtual-token rows stay 2-D and do decay).
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": recipe.train.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=recipe.train.learning_rate, betas=tuple(recipe.train.betas)
    )


def setup(
    recipe: Recipe, resume: bool = False, overwrite: bool = False, console: Console | None = None
) -> Setup:
    console = console or Console()
    output_dir = Path(recipe.output_dir)
    resume_from = rundir.check_output_dir(output_dir, resume, overwrite)
    check_data_source(recipe.data)  # bad data is refused before the model is loaded

    train = recipe.train
    # cpu=True on a machine without CUDA is what makes accelerate see a multi-process CPU (gloo) launch.
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(train.mixed_precision), cpu=not torch.cuda.is_available()
    )
    set_seed(train.seed)
    say = console.print if accelerator.is_main_process else (lambda *a, **k: None)
    if accelerator.num_processes > 1:
        say(
            f"{accelerator.num_processes} processes ({accelerator.distributed_type.value}), "
            f"global batch {train.batch_size * accelerator.num_processes * train.gradient_accumulation}"
        )

    tokenizer = load_tokenizer(recipe.model.name, recipe.model.trust_remote_code, recipe.model.revision)
    with accelerator.main_process_first():
        data = prepare_data(recipe.data, tokenizer, recipe.model.task, train.seed)
    say(f"data: {data.describe()}")

    say(f"model: loading {recipe.model.name}")
    model = load_model(
        recipe.model.name,
        recipe.model.task,
        label_names=data.label_names,
        num_labels=recipe.model.num_labels,
        dtype=recipe.model.dtype,
        trust_remote_code=recipe.model.trust_remote_code,
        revision=recipe.model.revision,
    )
    set_seed(train.seed)  # the adapter's init does not depend on how much randomness loading used
    model = _inject(model, recipe, tokenizer)
    _upcast_trainable(model, autocast=accelerator.mixed_precision != "no")
    head = enable_step_paths(model, train, recipe.model.task)
    trainable, total = count_parameters(model)
    params = {"trainable": trainable, "total": total, "trainable_percent": round(100 * trainable / total, 6)}
    say(
        f"method: {recipe.method.name}: {trainable:,} trainable of {total:,} parameters "
        f"({params['trainable_percent']:.4f}%)"
    )
    model.train()

    optimizer = _optimizer(model, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)

    global_batch = train.batch_size * accelerator.num_processes * train.gradient_accumulation
    steps_per_epoch = math.ceil(len(data.train) / global_batch)
    total_steps = train.max_steps or max(1, math.ceil((train.epochs or 1.0) * steps_per_epoch))

    s = Setup(
        recipe,
        accelerator,
        model,
        tokenizer,
        optimizer,
        data.train,
        data.validation,
        data.pad_id,
        data.label_names,
        head,
        total_steps,
        output_dir,
        params,
        console=console,
    )
    if resume_from is not None:
        state = checkpoint.load_training_state(resume_from, accelerator.unwrap_model(model), optimizer)
        s.start_step = state["step"]
        say(f"resuming from {resume_from} (step {s.start_step} of {total_steps})")
    return s


# --------------------------------------------------------------------------------------------------
# batches and the loss


def micro_batches(s: Setup, step: int) -> list[dict[str, torch.Tensor]]:
    """This process's gradient-accumulation micro-batches for one optimizer step."""
    t = s.recipe.train
    world, rank = s.accelerator.num_processes, s.accelerator.process_index
    indices = schedule.global_batch_indices(
        len(s.train_examples), t.batch_size * world * t.gradient_accumulation, step, t.seed
    )
    batches = []
    for micro in range(t.gradient_accumulation):
        start = (micro * world + rank) * t.batch_size
        rows = [s.train_examples[i] for i in indices[start : start + t.batch_size]]
        batches.append(collate(rows, s.pad_id))
    return batches


def loss_sum(s: Setup, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed loss over the batch's targets (tokens for causal LM, examples for classification)."""
    return loss_and_logits(s, model, batch)[0]


def loss_and_logits(s: Setup, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, the model's logits); with the chunked loss on, "logits" are final hidden states."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if s.recipe.model.task == "sequence-classification":
        return classification_loss_sum(logits, labels), logits
    if s.head is not None:
        return chunked_causal_lm_loss_sum(logits, s.head.weight, s.head.bias, labels), logits
    return causal_lm_loss_sum(logits, labels), logits


def num_targets(s: Setup, batch: dict[str, torch.Tensor]) -> int:
    labels = batch["labels"]
    if s.recipe.model.task == "sequence-classification":
        return labels.shape[0]
    return int((labels[:, 1:] != -100).sum())


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(s: Setup) -> dict[str, float] | None:
    """Loss (and perplexity or accuracy) over this process's shard of the validation set, reduced."""
    if not s.eval_examples:
        return None
    model = s.accelerator.unwrap_model(s.model)
    was_training = model.training
    model.eval()
    t = s.recipe.train
    world, rank = s.accelerator.num_processes, s.accelerator.process_index
    shard = list(range(rank, len(s.eval_examples), world))
    size = t.eval_batch_size or t.batch_size
    if t.max_eval_batches:
        shard = shard[: size * t.max_eval_batches]
    totals = torch.zeros(3, dtype=torch.float64, device=s.accelerator.device)  # loss, targets, correct
    for start in range(0, len(shard), size):
        rows = [s.eval_examples[i] for i in shard[start : start + size]]
        batch = _to(collate(rows, s.pad_id), s.accelerator.device)
        with s.accelerator.autocast():
            loss, logits = loss_and_logits(s, model, batch)
        totals[0] += float(loss)
        totals[1] += num_targets(s, batch)
        if s.recipe.model.task == "sequence-classification":
            totals[2] += int((logits.argmax(-1) == batch["labels"]).sum())
    totals = s.accelerator.reduce(totals, "sum")
    model.train(was_training)
    loss = float(totals[0] / max(totals[1], 1))
    if s.recipe.model.task == "sequence-classification":
        return {"loss": loss, "accuracy": float(totals[2] / max(totals[1], 1))}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# --------------------------------------------------------------------------------------------------
# the loop


class _Interrupt:
    """First Ctrl-C asks the loop to checkpoint and stop; a second one stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def fit(s: Setup, log) -> dict:
    """Train from s.start_step to s.total_steps. `log(record)` receives every metrics line."""
    t, acc = s.recipe.train, s.accelerator
    summary = {"tokens": 0, "train_seconds": 0.0, "stopped": None, "steps": s.start_step}
    if s.start_step == 0 and s.eval_examples:
        record = {"type": "eval", "step": 0, **evaluate(s)}
        log(record)
        if acc.is_main_process:
            s.console.print(_eval_line(record))
    progress = Progress(
        TextColumn("[bold]step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=s.console,
        disable=not acc.is_main_process,
    )
    with _Interrupt() as interrupt, progress:
        bar = progress.add_task("train", total=s.total_steps, completed=s.start_step, info="")
        for step in range(s.start_step, s.total_steps):
            started = time.perf_counter()
            batches = [_to(b, acc.device) for b in micro_batches(s, step)]
            counts = torch.tensor(
                [
                    sum(num_targets(s, b) for b in batches),
                    sum(int(b["attention_mask"].sum()) for b in batches),
                ],
                device=acc.device,
            )
            global_targets, global_tokens = (int(x) for x in acc.reduce(counts, "sum"))
            lr = schedule.learning_rate(t, step, s.total_steps)
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=acc.device)
            for i, batch in enumerate(batches):
                # Only the last micro-batch syncs gradients across processes.
                context = acc.no_sync(s.model) if i < len(batches) - 1 else contextlib.nullcontext()
                with context, acc.autocast():
                    loss = loss_sum(s, s.model, batch)
                    step_loss += loss.detach()
                    # DDP averages gradients over processes: scale so the update is sum / global_targets.
                    acc.backward(loss * acc.num_processes / max(global_targets, 1))
            step_loss = float(acc.reduce(step_loss, "sum")) / max(global_targets, 1)
            if not math.isfinite(step_loss):
                s.optimizer.zero_grad(set_to_none=True)
                summary["stopped"] = f"non-finite loss ({step_loss}) at step {step + 1}"
                break
            # With no clipping asked for, an infinite max norm still measures the norm without scaling.
            max_norm = t.max_grad_norm if t.max_grad_norm is not None else math.inf
            norm = acc.clip_grad_norm_([p for p in s.model.parameters() if p.requires_grad], max_norm)
            if not math.isfinite(float(norm)):  # a finite loss can still overflow in backward
                s.optimizer.zero_grad(set_to_none=True)
                summary["stopped"] = f"non-finite gradient norm ({float(norm)}) at step {step + 1}"
                break
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)

            seconds = time.perf_counter() - started
            summary["tokens"] += global_tokens
            summary["train_seconds"] += seconds
            done = step + 1
            if done % t.log_every == 0 or done == s.total_steps:
                log(
                    {
                        "type": "train",
                        "step": done,
                        "loss": step_loss,
                        "lr": lr,
                        "tokens_per_second": global_tokens / seconds,
                        "step_seconds": seconds,
                    }
                )
            progress.update(
                bar,
                completed=done,
                info=f"loss {step_loss:.4f}  lr {lr:.2e}  {global_tokens / seconds:,.0f} tok/s",
            )
            if t.eval_every and done % t.eval_every == 0 and done != s.total_steps and s.eval_examples:
                record = {"type": "eval", "step": done, **evaluate(s)}
                log(record)
                if acc.is_main_process:
                    s.console.print(_eval_line(record))
            summary["steps"] = done
            # Every process must agree to stop, or the next step's collectives would hang.
            stop = bool(acc.reduce(torch.tensor(float(interrupt.requested), device=acc.device), "sum"))
            if stop or (t.save_every and done % t.save_every == 0 and done != s.total_steps):
                save_checkpoint(s, done)
            if stop:
                summary["stopped"] = f"interrupted at step {done}"
                summary["interrupted"] = True
                break
    return summary


def _eval_line(record: dict) -> str:
    extra = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("type", "step"))
    return f"eval @ step {record['step']}: {extra}"


# --------------------------------------------------------------------------------------------------
# files


def save_checkpoint(s: Setup, step: int) -> None:
    """Adapter + trainable parameters + optimizer + RNG, written by the main process only."""
    if not s.accelerator.is_main_process:
        return
    model = s.accelerator.unwrap_model(s.model)

    def write(directory: Path) -> None:
        save_adapter_files(s, directory)
        checkpoint.save_training_state(
            directory, model, s.optimizer, {"step": step, "seed": s.recipe.train.seed}
        )

    rundir.write_checkpoint(s.output_dir, step, s.recipe.train.keep_checkpoints, write)


def save_adapter_files(s: Setup, directory: Path) -> None:
    model = s.accelerator.unwrap_model(s.model)
    checkpoint.save_adapter(
        model,
        s.recipe.method,
        s.recipe.model.task,
        portable_name(s.recipe.model.name),
        directory,
        label_names=s.label_names,
    )


def run(
    recipe: Recipe,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    recipe_path: str | None = None,
) -> dict:
    """The whole `peft train`: returns the report summary."""
    console = console or Console()
    started = time.perf_counter()
    s = setup(recipe, resume=resume, overwrite=overwrite, console=console)
    main = s.accelerator.is_main_process
    out = s.output_dir
    metrics = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:
            rundir.clear_previous_run(out)
        fileio.write_text(out / "recipe.yaml", dump_recipe(recipe))
        metrics = rundir.MetricsLog(out / "metrics.jsonl", keep_until_step=s.start_step if resume else None)

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.append(record)

    summary = fit(s, log)
    final_eval = evaluate(s) if summary["stopped"] is None else None
    if final_eval is not None:
        log({"type": "eval", "step": s.total_steps, **final_eval})
        if main:
            console.print(_eval_line({"step": s.total_steps, **final_eval}))
    s.accelerator.wait_for_everyone()
    disable_chunked_loss(s.accelerator.unwrap_model(s.model))
    if main and not summary.get("interrupted"):
        save_adapter_files(s, out)
        rundir.save_tokenizer(s.tokenizer, out)
        all_metrics = metrics.read()
        evals = [r for r in all_metrics if r["type"] == "eval"]
        train_losses = [r["loss"] for r in all_metrics if r["type"] == "train"]  # resumed runs too
        result = {
            "method": recipe.method.name,
            "model": recipe.model.name,
            "task": recipe.model.task,
            "params": s.params,
            "steps": summary["steps"],
            "train_loss": {
                "first": train_losses[0] if train_losses else None,
                "last": train_losses[-1] if train_losses else None,
            },
            "eval": {
                "before": _strip(evals[0]) if evals and evals[0]["step"] == 0 else None,
                "after": _strip(final_eval) if final_eval else None,
            },
            "tokens_per_second": summary["tokens"] / summary["train_seconds"]
            if summary["train_seconds"]
            else 0.0,
            "peak_memory_bytes": report.peak_memory_bytes(),
            "wall_seconds": time.perf_counter() - started,
            "stopped": summary["stopped"],
            "adapter_dir": str(out),
            "recipe": recipe_path,
        }
        report.write_report(out, result, all_metrics)
    if summary.get("interrupted"):
        raise TrainingStopped(
            f"{summary['stopped']}; checkpoint saved. Continue with: "
            f"peft train {recipe_path or 'RECIPE'} --resume",
            exit_code=130,
        )
    if summary["stopped"]:
        raise TrainingStopped(f"training stopped: {summary['stopped']}; the last good adapter is in {out}")
    if main:
        console.print(f"[bold green]done:[/] adapter and report in {out}")
    return summary


def _strip(record: dict | None) -> dict | None:
    return {k: v for k, v in record.items() if k not in ("type", "step")} if record else None
