"""The training loop: setup() builds everything, fit() trains, evaluate() measures.

Batches are cut from a seeded permutation per epoch into *global* batches of
batch_size x processes x gradient_accumulation examples (preference pairs count as one); each process takes
its slice. What the step minimises is the recipe's train.objective (objectives.py): a sum over the micro-
batch divided by the global batch's count (target tokens for SFT, pairs for DPO ...), so one process at batch
size 8 and two processes at batch size 4 compute the same loss and the same update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
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
from peftcli.recipe import Recipe
from peftcli.runs import adapter as adapter_files
from peftcli.train import distributed, reference, schedule, state
from peftcli.train.objectives import Objective, make_objective
from peftcli.train.optim import make_optimizer
from peftcli.train.signals import StopRequest

log = logging.getLogger(__name__)


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
    objective: Objective
    # The speed-ups in place (peftcli/fast): undone when training ends.
    speedups: fast.Installed = field(default_factory=fast.Installed)
    # The base's dtype and weight storage, and why; what the frozen weights occupy (Precision.report).
    precision: dict = field(default_factory=dict)
    start_step: int = 0
    mode: str = "single"  # how the processes share the model: single, ddp or fsdp (train/distributed.py)
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


def inject(model, recipe: Recipe, tokenizer, initial: dict | None = None):
    """The recipe's method in `model`: fresh (or, resuming, from the checkpoint's `initial` state of the
    method), or loaded from method.from_adapter."""
    method = recipe.method
    if method.from_adapter:
        model, loaded = adapter_files.load_adapter(model, method.from_adapter)
        if loaded.name != method.name:
            raise UserError(
                f"method.from_adapter: {method.from_adapter} is a {loaded.name} adapter, "
                f"the recipe's method is {method.name}"
            )
        loaded = dataclasses.replace(loaded, from_adapter=method.from_adapter)  # what trains, from where
        for key in type(loaded).TRAINING_FIELDS:  # not in the adapter files: the recipe's
            setattr(loaded, key, getattr(method, key))
        recipe.method = loaded
        return model
    return METHODS[method.name].inject(model, method, Context(recipe.model.task, tokenizer, initial))


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


def setup(recipe: Recipe, resume_from: Path | None = None, console: Console | None = None) -> Setup:
    """Everything the loop needs: data, model with the method injected, optimizer, accelerator; with
    `resume_from`, that checkpoint's training state."""
    console = console or Console()
    output_dir = Path(recipe.output_dir).expanduser()
    check_data_source(recipe.data)  # bad data is refused before the model is loaded

    train, m = recipe.train, recipe.model
    # cpu=True on a machine without CUDA is what makes accelerate see a multi-process CPU (gloo) launch.
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(train.mixed_precision), cpu=not torch.cuda.is_available()
    )
    set_seed(train.seed)
    say = console.print if accelerator.is_main_process else (lambda *a, **k: None)
    global_batch = train.batch_size * accelerator.num_processes * train.gradient_accumulation

    tokenizer = load_tokenizer(m.source, m.trust_remote_code, m.revision)
    with accelerator.main_process_first():
        data = prepare_data(recipe.data, tokenizer, m.task, train.seed)
    say(f"data: {data.describe()}")
    check_data(recipe, data, accelerator.num_processes)
    chosen = precision_of(m.source, m.dtype, m.quantize)
    say(f"model: loading {m.name}: {chosen.describe()}")
    initial = state.load_initial_state(resume_from) if resume_from is not None else None
    model, speedups, params = build_model(
        recipe, tokenizer, data.label_names, autocast=accelerator.mixed_precision != "no", initial=initial
    )
    say(
        f"method: {recipe.method.name}: {params['trainable']:,} trainable of {params['total']:,} parameters "
        f"({params['trainable_percent']:.4f}%)"
    )
    model.train()
    precision = chosen.report(model)  # before sharding: it reads every frozen tensor's storage
    mode = distributed.resolve(recipe, accelerator, model)
    model, optimizer = distributed.prepare(accelerator, model, mode, lambda m: make_optimizer(m, recipe))
    set_seed(train.seed + accelerator.process_index)  # each process its own dropout masks, run to run alike
    objective = _objective(recipe, accelerator, model, data, speedups, say, together=mode == "fsdp")

    steps_per_epoch = math.ceil(len(data.train) / global_batch)
    total_steps = train.max_steps or max(1, math.ceil((train.epochs or 1.0) * steps_per_epoch))
    s = Setup(
        recipe, accelerator, model, tokenizer, optimizer, data.train, data.validation, data.pad_id,
        data.label_names, total_steps, output_dir, params, objective, speedups=speedups,
        precision=precision, console=console, mode=mode,
    )  # fmt: skip
    if mode != "single":
        say(f"{accelerator.num_processes} processes ({mode}), global batch {global_batch}")
    if resume_from is not None:
        saved = state.load_training_state(
            resume_from, accelerator, accelerator.unwrap_model(model), optimizer
        )
        s.start_step = saved["step"]
        say(f"resuming from {resume_from} (step {s.start_step} of {total_steps})")
    return s


def check_data(recipe: Recipe, data, processes: int) -> None:
    """What the data must agree with: model.num_labels, and the batch size. A micro-batch larger than the
    data is refused (it would only repeat examples, and memory grows with it); a step's whole batch larger
    than the data is allowed, with a note that it repeats examples."""
    num_labels, labels = recipe.model.num_labels, data.label_names
    if num_labels and labels and num_labels != len(labels):
        raise UserError(
            f"model.num_labels: {num_labels}, but the data has {len(labels)} labels "
            f"({', '.join(labels)}); leave model.num_labels out to take the data's"
        )
    train, examples = recipe.train, len(data.train)
    per_step = train.batch_size * processes
    if per_step > examples:
        spread = f" x {processes} processes" if processes > 1 else ""
        raise UserError(
            f"train.batch_size: {train.batch_size}{spread} is more than the {examples} training examples; "
            f"use at most {max(1, examples // processes)}"
        )
    if per_step * train.gradient_accumulation > examples:
        log.warning(
            "a step's batch (train.batch_size %d x train.gradient_accumulation %d%s) is more than the %d "
            "training examples: every step sees some of them twice",
            train.batch_size,
            train.gradient_accumulation,
            f" x {processes} processes" if processes > 1 else "",
            examples,
        )


def _objective(recipe: Recipe, accelerator: Accelerator, model, data, speedups, say, together) -> Objective:
    """The recipe's objective; where it needs them, the reference policy's log-probs for every row of the
    data (train/reference.py), before any update and before a resumed run loads its trained state: the main
    process computes them, the others read its cache; `together` (a sharded model): all compute them."""
    objective = make_objective(recipe, speedups, lambda t: accelerator.reduce(t, "sum"))
    if not objective.needs_reference:
        return objective
    splits = {"train": data.train, "validation": data.validation}
    splits = {name: split for name, split in splits.items() if split is not None}
    size = 2 * (recipe.train.eval_batch_size or recipe.train.batch_size)  # rows: a pair is two
    with contextlib.nullcontext() if together else accelerator.main_process_first():
        model = accelerator.unwrap_model(model)
        hit = reference.attach(
            splits, model, recipe, data, objective.token_logprobs, size, accelerator, together
        )
    say(f"reference log-probs: {'from cache' if hit else 'computed and cached'}")
    return objective


def build_model(
    recipe: Recipe, tokenizer, label_names: list[str] | None, autocast: bool, initial: dict | None = None
):
    """(the base model with the recipe's method injected and its speed-ups installed, the speed-ups,
    the parameter counts). `initial`: a resumed run's starting point of the method (see inject)."""
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
    model = inject(model, recipe, tokenizer, initial)
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


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(s: Setup) -> dict[str, float] | None:
    """The objective's eval metrics over this process's shard of the validation set, reduced."""
    if not s.eval_examples:
        return None
    model = s.accelerator.unwrap_model(s.model)
    was_training = model.training
    model.eval()
    t = s.recipe.train
    world, rank = s.accelerator.num_processes, s.accelerator.process_index
    shard = list(range(rank, len(s.eval_examples), world))
    size = t.eval_batch_size or t.batch_size
    # As many rounds on every process as on the first, whose share is the longest: a sharded model's
    # forward (and KTO's reference point) is a collective, so a process out of rows runs a stand-in that
    # counts nowhere.
    rounds = math.ceil(math.ceil(len(s.eval_examples) / world) / size)
    if t.max_eval_batches:
        rounds = min(rounds, t.max_eval_batches)
    collective = s.mode == "fsdp" or (world > 1 and s.objective.eval_collective)
    totals = torch.zeros(len(s.objective.EVAL_SUMS), dtype=torch.float64)
    for start in range(0, rounds * size, size):
        rows = [s.eval_examples[i] for i in shard[start : start + size]]
        if not rows and not collective:
            break
        batch = _to(collate(rows or [s.eval_examples[0]], s.pad_id), s.accelerator.device)
        with s.accelerator.autocast():
            if rows:
                totals += s.objective.eval_sums(model, batch)
            else:
                s.objective.eval_stand_in(model, batch)
    totals = s.accelerator.reduce(totals.to(s.accelerator.device), "sum").cpu()
    model.train(was_training)
    return s.objective.eval_metrics(totals)


# --------------------------------------------------------------------------------------------------
# the loop


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
    with StopRequest() as interrupt, progress:
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
            # The last step is checkpointed too: a finished run can be resumed with a larger max_steps.
            if stop or done == s.total_steps or (t.save_every and done % t.save_every == 0):
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
    # What each micro-batch's loss is divided by: the objective's counts over the global batch.
    counts = torch.stack([s.objective.counts(b) for b in batches]).sum(0)
    tokens = sum(int(v.sum()) for b in batches for k, v in b.items() if k.endswith("attention_mask"))
    totals = acc.reduce(torch.cat([counts, counts.new_tensor([tokens])]).to(acc.device), "sum")
    global_tokens = int(totals[-1])
    lr = schedule.learning_rate(t, step, s.total_steps)
    for group in s.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    step_loss = torch.zeros((), device=acc.device)
    for i, batch in enumerate(batches):
        # Only the last micro-batch syncs gradients across processes.
        context = distributed.no_sync(acc, s.model) if i < len(batches) - 1 else contextlib.nullcontext()
        with context, acc.autocast():
            value = s.objective.loss(s.model, batch, totals)
            step_loss += value.detach()
            # DDP and FSDP average gradients over processes: scale so the update is the global batch's.
            acc.backward(value * acc.num_processes)
    step_loss = float(acc.reduce(step_loss, "sum"))
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
