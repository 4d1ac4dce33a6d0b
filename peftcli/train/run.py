"""`peft train`: the loop (loop.py) tied to its output dir — recipe.yaml, metrics, checkpoints, the
adapter and the report.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from peftcli import fileio, report
from peftcli.errors import UserError
from peftcli.recipe import Recipe, dump_recipe
from peftcli.runs import adapter as adapter_files
from peftcli.runs import rundir
from peftcli.runs.adapter import RECIPE_NAME
from peftcli.train import state
from peftcli.train.loop import Setup, eval_line, evaluate, fit, setup


class TrainingStopped(UserError):
    """The run stopped before its end: non-finite loss (exit 1, last good adapter kept) or Ctrl-C (130)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def save_checkpoint(s: Setup, step: int) -> None:
    """Adapter + trainable parameters + optimizer + RNG, written by the main process only."""
    if not s.accelerator.is_main_process:
        return
    model = s.accelerator.unwrap_model(s.model)

    def write(directory: Path) -> None:
        save_adapter_files(s, directory)
        state.save_training_state(directory, model, s.optimizer, {"step": step, "seed": s.recipe.train.seed})

    rundir.write_checkpoint(s.output_dir, step, s.recipe.train.keep_checkpoints, write)


def save_adapter_files(s: Setup, directory: Path) -> None:
    adapter_files.save_adapter(
        s.accelerator.unwrap_model(s.model),
        s.recipe.method,
        s.recipe.model.task,
        s.recipe.model.source.portable_name,
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
        fileio.write_text(out / RECIPE_NAME, dump_recipe(recipe))
        metrics = rundir.MetricsLog(out / "metrics.jsonl", keep_until_step=s.start_step if resume else None)

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
    if main and not summary.get("interrupted"):
        save_adapter_files(s, out)
        rundir.save_tokenizer(s.tokenizer, out)
        all_metrics = metrics.read()
        report.write_report(
            out, _report(s, summary, final_eval, all_metrics, started, recipe_path), all_metrics
        )
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


def _report(
    s: Setup, summary: dict, final_eval: dict | None, all_metrics: list[dict], started: float, recipe_path
) -> dict:
    """report.json's summary of the run."""
    recipe = s.recipe
    evals = [r for r in all_metrics if r["type"] == "eval"]
    train_losses = [r["loss"] for r in all_metrics if r["type"] == "train"]  # resumed runs too
    return {
        "method": recipe.method.name,
        "model": recipe.model.name,
        "task": recipe.model.task,
        "params": s.params,
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
        "wall_seconds": time.perf_counter() - started,
        "stopped": summary["stopped"],
        "adapter_dir": str(s.output_dir),
        "recipe": recipe_path,
    }


def _strip(record: dict | None) -> dict | None:
    return {k: v for k, v in record.items() if k not in ("type", "step")} if record else None
