"""The training loop: setup() builds everything, fit() trains, evaluate() measures.

Batches are cut from a seeded permutation per epoch into *global* batches of
batch_size x processes x gradient_accumulation examples; each process takes its slice. The loss is a
sum over target tokens divided by the global batch's token count, so one process at batch size 8
and two processes at batch size 4 compute the same loss and the same update.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from peftcli import fast
from peftcli.data.batches import TokenizedDataset, collate
from peftcli.data.prepare import prepare_data
from peftcli.data.sources import check_data_source
from peftcli.errors import UserError
from peftcli.methods import METHODS, Context
from peftcli.methods.modules import adapted_layers, count_parameters
from peftcli.models.load import load_model, load_tokenizer, precision_of
from peftcli.models.precision import Precision
from peftcli.quant import convert as quant_convert
from peftcli.recipe import Recipe
from peftcli.runs import adapter as adapter_files
from peftcli.runs import rundir
from peftcli.train import loss, schedule, state


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
    total_steps: int
    output_dir: Path
    params: dict
    # The speed-ups in place (peftcli/fast): undone when training ends.
    speedups: fast.Installed = field(default_factory=fast.Installed)
    # The base's dtype and weight storage, and why; what the frozen weights occupy (precision_report).
    precision: dict = field(default_factory=dict)
    start_step: int = 0
    console: Console = field(default_factory=Console)

    @property
    def task(self) -> str:
        return self.recipe.model.task


# --------------------------------------------------------------------------------------------------
# setup


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def inject(model, recipe: Recipe, tokenizer):
    """The recipe's method in `model`: fresh, or loaded from method.from_adapter."""
    method = recipe.method
    if method.from_adapter:
        model, loaded = adapter_files.load_adapter(model, method.from_adapter)
        if loaded.name != method.name:
            raise UserError(
                f"method.from_adapter: {method.from_adapter} is a {loaded.name} adapter, "
                f"the recipe's method is {method.name}"
            )
        recipe.method = loaded
        return model
    return METHODS[method.name].inject(model, method, Context(recipe.model.task, tokenizer))


def upcast_trainable(model, autocast: bool) -> None:
    """Keep what trains in fp32 on a half-precision base: a bf16 weight cannot hold AdamW's small updates
    (at lr 1e-4 most round away), and fp16 gradients cannot be unscaled. The parts of layers whose forward
    casts its input (LoRA's) take fp32 on any base; other trainable modules (heads, prompts, adapters)
    rely on autocast for that."""
    if autocast:
        params = list(model.parameters())
    else:
        params = [
            p for _, layer in adapted_layers(model) if layer.casts_input for p in layer.parts().values()
        ]
    for param in params:
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def precision_report(model, chosen: Precision) -> dict:
    """report.json's `precision`: the base's dtype and storage with the reasons, the formats of its quantized
    layers, what its frozen weights occupy, and the dtype of what trains (fp32 master copies, above)."""
    trained = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    return {
        **chosen.to_dict(),
        "quantized_layers": quant_convert.describe(model),
        "frozen_bytes": quant_convert.frozen_bytes(model),
        "trainable_dtype": ", ".join(trained),
    }


def make_optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
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
    """Everything the loop needs: data, model with the method injected, optimizer, accelerator; the
    training state of the newest checkpoint when resuming."""
    console = console or Console()
    output_dir = Path(recipe.output_dir)
    resume_from = rundir.check_output_dir(output_dir, resume, overwrite)
    check_data_source(recipe.data)  # bad data is refused before the model is loaded

    train, m = recipe.train, recipe.model
    # cpu=True on a machine without CUDA is what makes accelerate see a multi-process CPU (gloo) launch.
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(train.mixed_precision), cpu=not torch.cuda.is_available()
    )
    set_seed(train.seed)
    say = console.print if accelerator.is_main_process else (lambda *a, **k: None)
    global_batch = train.batch_size * accelerator.num_processes * train.gradient_accumulation
    if accelerator.num_processes > 1:
        say(
            f"{accelerator.num_processes} processes ({accelerator.distributed_type.value}), "
            f"global batch {global_batch}"
        )

    tokenizer = load_tokenizer(m.source, m.trust_remote_code, m.revision)
    with accelerator.main_process_first():
        data = prepare_data(recipe.data, tokenizer, m.task, train.seed)
    say(f"data: {data.describe()}")
    chosen = precision_of(m.source, m.dtype, m.quantize)
    say(f"model: loading {m.name}: {chosen.describe()}")
    model, speedups, params = build_model(
        recipe, tokenizer, data.label_names, autocast=accelerator.mixed_precision != "no"
    )
    say(
        f"method: {recipe.method.name}: {params['trainable']:,} trainable of {params['total']:,} parameters "
        f"({params['trainable_percent']:.4f}%)"
    )
    model.train()
    optimizer = make_optimizer(model, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)

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
        total_steps,
        output_dir,
        params,
        speedups=speedups,
        precision=precision_report(model, chosen),
        console=console,
    )
    if resume_from is not None:
        saved = state.load_training_state(resume_from, accelerator.unwrap_model(model), optimizer)
        s.start_step = saved["step"]
        say(f"resuming from {resume_from} (step {s.start_step} of {total_steps})")
    return s


def build_model(recipe: Recipe, tokenizer, label_names: list[str] | None, autocast: bool):
    """(the base model with the recipe's method injected and its speed-ups installed, the speed-ups,
    the parameter counts)."""
    m = recipe.model
    model = load_model(
        m.source,
        m.task,
        label_names=label_names,
        num_labels=m.num_labels,
        dtype=m.dtype,
        quantize=m.quantize,
        trust_remote_code=m.trust_remote_code,
        revision=m.revision,
    )
    set_seed(recipe.train.seed)  # the adapter's init does not depend on how much randomness loading used
    model = inject(model, recipe, tokenizer)
    upcast_trainable(model, autocast)
    speedups = fast.install(model, recipe.train, m.task)
    trainable, total = count_parameters(model)
    params = {"trainable": trainable, "total": total, "trainable_percent": round(100 * trainable / total, 6)}
    return model, speedups, params


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
    """Summed loss over the batch's targets: the speed-ups' loss where one is installed, else the plain."""
    if s.speedups.loss is not None:
        return s.speedups.loss(model, batch)
    return loss.loss_sum(model, batch, s.task)


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
    classify = s.task == "sequence-classification"
    totals = torch.zeros(3, dtype=torch.float64, device=s.accelerator.device)  # loss, targets, correct
    for start in range(0, len(shard), size):
        rows = [s.eval_examples[i] for i in shard[start : start + size]]
        batch = _to(collate(rows, s.pad_id), s.accelerator.device)
        with s.accelerator.autocast():
            if classify:  # one forward gives both the loss and the predictions
                logits = loss.logits_of(model, batch)
                totals[0] += float(loss.classification_loss_sum(logits, batch["labels"]))
                totals[2] += int((logits.argmax(-1) == batch["labels"]).sum())
            else:
                totals[0] += float(loss_sum(s, model, batch))
        totals[1] += loss.num_targets(batch, s.task)
    totals = s.accelerator.reduce(totals, "sum")
    model.train(was_training)
    mean = float(totals[0] / max(totals[1], 1))
    if classify:
        return {"loss": mean, "accuracy": float(totals[2] / max(totals[1], 1))}
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


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


def fit(s: Setup, log: Callable[[dict], None], save_checkpoint: Callable[[int], None]) -> dict:
    """Train from s.start_step to s.total_steps. `log(record)` receives every metrics line;
    `save_checkpoint(step)` is called every train.save_every steps and on Ctrl-C."""
    t, acc = s.recipe.train, s.accelerator
    summary = {"tokens": 0, "train_seconds": 0.0, "stopped": None, "steps": s.start_step}
    if s.start_step == 0 and s.eval_examples:
        _log_eval(s, log, 0)
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
            record = train_step(s, step)
            if "stopped" in record:
                summary["stopped"] = record["stopped"]
                break
            seconds = time.perf_counter() - started
            tokens = record.pop("tokens")
            summary["tokens"] += tokens
            summary["train_seconds"] += seconds
            done = step + 1
            if done % t.log_every == 0 or done == s.total_steps:
                speed = {"tokens_per_second": tokens / seconds, "step_seconds": seconds}
                log({"type": "train", "step": done, **record, **speed})
            progress.update(
                bar,
                completed=done,
                info=f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {tokens / seconds:,.0f} tok/s",
            )
            if t.eval_every and done % t.eval_every == 0 and done != s.total_steps and s.eval_examples:
                _log_eval(s, log, done)
            summary["steps"] = done
            # Every process must agree to stop, or the next step's collectives would hang.
            stop = bool(acc.reduce(torch.tensor(float(interrupt.requested), device=acc.device), "sum"))
            if stop or (t.save_every and done % t.save_every == 0 and done != s.total_steps):
                save_checkpoint(done)
            if stop:
                summary["stopped"] = f"interrupted at step {done}"
                summary["interrupted"] = True
                break
    return summary


def train_step(s: Setup, step: int) -> dict:
    """One optimizer step (0-based `step`): {"loss", "lr", "tokens"}, or {"stopped": why} where a
    non-finite loss or gradient norm made it skip the update."""
    t, acc = s.recipe.train, s.accelerator
    batches = [_to(b, acc.device) for b in micro_batches(s, step)]
    counts = torch.tensor(
        [
            sum(loss.num_targets(b, s.task) for b in batches),
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
            value = loss_sum(s, s.model, batch)
            step_loss += value.detach()
            # DDP averages gradients over processes: scale so the update is sum / global_targets.
            acc.backward(value * acc.num_processes / max(global_targets, 1))
    step_loss = float(acc.reduce(step_loss, "sum")) / max(global_targets, 1)
    if not math.isfinite(step_loss):
        s.optimizer.zero_grad(set_to_none=True)
        return {"stopped": f"non-finite loss ({step_loss}) at step {step + 1}"}
    # With no clipping asked for, an infinite max norm still measures the norm without scaling.
    max_norm = t.max_grad_norm if t.max_grad_norm is not None else math.inf
    norm = acc.clip_grad_norm_([p for p in s.model.parameters() if p.requires_grad], max_norm)
    if not math.isfinite(float(norm)):  # a finite loss can still overflow in backward
        s.optimizer.zero_grad(set_to_none=True)
        return {"stopped": f"non-finite gradient norm ({float(norm)}) at step {step + 1}"}
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return {"loss": step_loss, "lr": lr, "tokens": global_tokens}


def _log_eval(s: Setup, log: Callable[[dict], None], step: int) -> dict:
    record = {"type": "eval", "step": step, **evaluate(s)}
    log(record)
    if s.accelerator.is_main_process:
        s.console.print(eval_line(record))
    return record


def eval_line(record: dict) -> str:
    extra = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("type", "step"))
    return f"eval @ step {record['step']}: {extra}"
