"""`peft train`: the loop (loop.py) tied to its output dir — recipe.yaml, metrics, checkpoints, the
adapter and the report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from peftcli import fileio, report
from peftcli.errors import UserError
from peftcli.fileio import disk_errors
from peftcli.methods import METHODS
from peftcli.recipe import Recipe, dump_recipe, read_run_recipe
from peftcli.recipe.changes import resume_changes
from peftcli.runs import adapter as adapter_files
from peftcli.runs import lock, rundir
from peftcli.runs.adapter import RECIPE_NAME
from peftcli.train import distributed, state
from peftcli.train.loop import Setup, eval_line, evaluate, fit, setup

log = logging.getLogger(__name__)


class TrainingStopped(UserError):
    """The run stopped before its end: non-finite loss (exit 1, last good adapter kept) or Ctrl-C (130)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def save_checkpoint(s: Setup, step: int) -> None:
    """Adapter + trainable parameters + optimizer + every process's RNG: gathered by all processes (a
    collective), written by the main process only."""
    model = s.accelerator.unwrap_model(s.model)
    with distributed.gathered(model):
        initial_state = getattr(METHODS[s.recipe.method.name], "initial_state", None)
        initial = initial_state(model) if initial_state else None
        tensors = state.collect(s.accelerator, model, s.optimizer, initial)
        if not s.accelerator.is_main_process:
            return

        def write(directory: Path) -> None:
            save_adapter_files(s, directory)
            step_state = {"step": step, "seed": s.recipe.train.seed, "processes": s.accelerator.num_processes}
            state.save_training_state(directory, tensors, s.optimizer, step_state)

        with disk_errors(f"checkpoint step {step} in {s.output_dir / 'checkpoints'}"):
            rundir.write_checkpoint(s.output_dir, step, s.recipe.train.keep_checkpoints, write)
    rundir.discard_set_aside(s.output_dir)  # a good state of its own: a run it replaces can go


def save_adapter_files(s: Setup, directory: Path) -> None:
    adapter_files.save_adapter(
        s.accelerator.unwrap_model(s.model),
        s.recipe.method,
        s.recipe.model.task,
        s.recipe.model.source.portable_name,
        directory,
        label_names=s.label_names,
    )


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (read before any process group exists), or a lone process."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def run(
    recipe: Recipe,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    recipe_path: str | None = None,
    on_trained: Callable[[Setup], dict] | None = None,
) -> dict:
    """The whole `peft train`: returns the report summary.

    The output dir is checked before anything loads, locked for the run, and never left without a good
    state: see runs/rundir.py for --overwrite and resume_plan for --resume.

    `on_trained(setup)`, called on every process once training has ended normally (with the trained model,
    speed-ups undone), returns more fields for report.json (`peft compare`'s probe answer): the main
    process's are kept.
    Peak memory and wall time are this call's own, so several runs in one process each report theirs.
    """
    console = console or Console()
    out = Path(recipe.output_dir).expanduser()
    rundir.check_writable(out)
    main = is_main_process()
    made = main and not out.exists()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        with lock.hold(out, "peft train") if main else contextlib.nullcontext():
            return _run_locked(recipe, out, main, resume, overwrite, console, recipe_path, on_trained)
    finally:
        if made and not any(out.iterdir()):  # a run refused before it wrote anything leaves no dir
            out.rmdir()


def _run_locked(
    recipe: Recipe, out: Path, main: bool, resume: bool, overwrite: bool, console, recipe_path, on_trained
):
    """The run, with the output dir held: a replaced run is set aside until the new one has a good state."""
    if main and rundir.restore_set_aside(out):
        console.print(f"note: put back the run in {out} that an interrupted --overwrite had set aside")
    resume_from = rundir.check_output_dir(out, resume, overwrite, readable=state.checkpoint_problem)
    changes = resume_plan(out, recipe) if resume else {}
    replacing = main and overwrite and any((out / m).exists() for m in rundir.RUN_MARKERS)
    if replacing:
        rundir.set_aside(out)
    try:
        return _train(recipe, resume_from, changes, console, recipe_path, on_trained)
    except BaseException:
        if replacing:
            rundir.restore_set_aside(out)  # a no-op once the new run has a good state
        raise


def resume_plan(out: Path, recipe: Recipe) -> dict:
    """The changes to the run's recipe that resuming it with `recipe` makes: refused (with every difference
    listed) unless all may change; a finished run with no more steps asked for is said to be complete."""
    if not (out / RECIPE_NAME).is_file():  # checkpoints copied without it: nothing to compare with
        log.warning("%s has no %s: the recipe given now is taken as the run's", out, RECIPE_NAME)
        return {}
    try:
        saved = read_run_recipe(out / RECIPE_NAME)
    except UserError as e:
        raise UserError(
            f"--resume: {out / RECIPE_NAME} does not read, so the run cannot be compared: {e}"
        ) from e
    refused, allowed = resume_changes(saved, recipe)
    if refused:
        raise UserError(
            f"--resume: the recipe differs from the run's own ({out / RECIPE_NAME}) in settings a resumed "
            f"run cannot change: {'; '.join(refused)}. Resume with the run's recipe "
            f"(peft train --resume {out}) or start a new run in another output_dir"
        )
    done = _read_report(out / rundir.REPORT_NAME)
    budget = ("train.max_steps", "train.epochs")
    if done and done.get("stopped") is None and not any(key in allowed for key in budget):
        raise RunComplete(f"{out} is complete ({done.get('steps')} steps): nothing to resume")
    return {key: list(values) for key, values in allowed.items()}


def _read_report(path: Path) -> dict | None:
    """A run's report.json, or None where there is none or it does not read (a file cut short: the run is
    not known to be complete)."""
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) else None


class RunComplete(UserError):
    """--resume on a finished run: said, not an error."""

    exit_code = 0


def _train(
    recipe: Recipe, resume_from: Path | None, changes: dict, console: Console, recipe_path, on_trained
) -> dict:
    started = time.perf_counter()
    report.reset_peak_memory()
    s = setup(recipe, resume_from=resume_from, console=console)
    main = s.accelerator.is_main_process
    out = s.output_dir
    if s.start_step > s.total_steps:
        raise UserError(
            f"train.max_steps: the run has trained {s.start_step} steps already, more than the "
            f"{s.total_steps} this recipe asks for; resume with at least as many"
        )
    metrics = None
    if main:
        fileio.write_text(out / RECIPE_NAME, dump_recipe(recipe))
        keep = s.start_step if resume_from is not None else None
        metrics = rundir.MetricsLog(out / rundir.METRICS_NAME, keep_until_step=keep, changed=changes)
        if changes:
            console.print(
                "resuming with " + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
            )

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.append(record)

    try:
        summary = fit(s, log, lambda step: save_checkpoint(s, step))
        final_eval = evaluate(s) if summary["stopped"] is None else None
    finally:
        s.speedups.undo()
    if final_eval is not None:
        log({"type": "eval", "step": s.total_steps, **final_eval})
        if main:
            console.print(eval_line({"step": s.total_steps, **final_eval}))
    s.accelerator.wait_for_everyone()
    if not summary.get("interrupted"):
        _finish(s, summary, final_eval, metrics, started, recipe_path, on_trained)
    if summary.get("interrupted"):
        raise TrainingStopped(
            f"{summary['stopped']}; checkpoint saved. Continue with: peft train --resume {out}", exit_code=130
        )
    if summary["stopped"]:
        raise TrainingStopped(f"training stopped: {summary['stopped']}; the last good adapter is in {out}")
    if main:
        console.print(f"[bold green]done:[/] adapter and report in {out}")
    return summary


def _finish(s: Setup, summary: dict, final_eval, metrics, started: float, recipe_path, on_trained) -> None:
    """The trained adapter (gathered by every process), the tokenizer and the report, written by the main
    process; `on_trained` runs on every process."""
    out = s.output_dir
    # On every process (a sharded model's forward is a collective), before the parameters are gathered.
    extra = on_trained(s) if on_trained is not None and summary["stopped"] is None else {}
    with distributed.gathered(s.accelerator.unwrap_model(s.model)):
        if not s.accelerator.is_main_process:
            return
        with disk_errors(f"the adapter and report in {out}"):
            save_adapter_files(s, out)
            rundir.save_tokenizer(s.tokenizer, out)
            all_metrics = metrics.read()
            summary_fields = _report(s, summary, final_eval, all_metrics, started, recipe_path)
            report.write_report(out, {**summary_fields, **extra}, all_metrics)
    rundir.discard_set_aside(out)


def _report(
    s: Setup, summary: dict, final_eval: dict | None, all_metrics: list[dict], started: float, recipe_path
) -> dict:
    """report.json's summary of the run."""
    recipe = s.recipe
    evals = [r for r in all_metrics if r["type"] == "eval"]
    train_losses = [r["loss"] for r in all_metrics if r["type"] == "train"]  # resumed runs too
    return {
        "method": recipe.method.name,
        "objective": recipe.train.objective.name,
        "model": recipe.model.name,
        "task": recipe.model.task,
        "params": s.params,
        "learning_rate": recipe.train.learning_rate,
        "precision": s.precision,
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
        "adapter_bytes": adapter_files.adapter_bytes(s.output_dir),
        "wall_seconds": time.perf_counter() - started,
        "stopped": summary["stopped"],
        "adapter_dir": str(s.output_dir),
        "recipe": recipe_path,
    }


def _strip(record: dict | None) -> dict | None:
    return {k: v for k, v in record.items() if k not in ("type", "step")} if record else None
