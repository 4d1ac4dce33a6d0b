"""`peft compare`: the plan's rows trained one after another, each an ordinary `peft train` run in its own
directory, then one table of them all (table.py) with its plots (plots.py).

Rows run in this process, in sequence; under a multi-process launch (accelerate launch, torchrun) every
process runs every row, so each row uses all processes as `peft train` would. Each row's report.json has
its own peak memory and wall time: `train.run.run` starts a new memory high-water mark when it starts
(report.reset_peak_memory: garbage collected, glibc's heap trimmed, then /proc/self/clear_refs), so a row's
peak is what was resident while it ran, not an earlier row's. What stays resident between rows (the
imported libraries, matplotlib loaded up front so that every row holds it) counts in every row alike.

`--resume` picks a comparison up where it stopped: a row with a report.json is done and is not retrained, a
row with a checkpoint continues from it, any other starts over. A row the recipe no longer describes (the
recipe or the flags changed since) is refused rather than mixed into the table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from peftcli import report
from peftcli.compare import plots, table
from peftcli.compare.plan import Plan, Row
from peftcli.data.prepare import probe_example
from peftcli.errors import UserError
from peftcli.infer import complete, prompt_style
from peftcli.recipe import read_run_recipe
from peftcli.runs import rundir
from peftcli.runs.adapter import RECIPE_NAME
from peftcli.train.run import TrainingStopped, run

PROBE_TOKENS = 64  # new tokens of each row's answer to the probe prompt


class Interrupted(UserError):
    """Ctrl-C during a row: its checkpoint is saved; exit code 130."""

    exit_code = 130


def compare(
    plan: Plan, resume: bool = False, overwrite: bool = False, console: Console | None = None
) -> dict:
    """Train every row of the plan (plan.make_plan) that is not done yet, then write compare.json,
    compare.md and the plots into the recipe's output_dir. Returns compare.json's content."""
    console = console or Console()
    main = _is_main_process()
    say = console.print if main else (lambda *a, **k: None)
    states = _row_states(plan, resume, overwrite)
    probe = (
        probe_example(plan.recipe.data, plan.recipe.train.seed)
        if plan.recipe.model.task == "causal-lm"
        else None
    )
    for name, why in plan.skipped:
        say(f"[yellow]not compared:[/] {name}: {why}")
    plots.preload()
    outcomes: dict[str, dict] = {}
    session_seconds: list[float] = []
    for index, row in enumerate(plan.rows):
        if states[row.name] == "done":
            say(f"[bold]row {index + 1}/{len(plan.rows)}: {row.name}[/]: done already, not retrained")
            continue
        remaining = sum(states[r.name] != "done" for r in plan.rows[index:])
        say(_row_heading(plan, index, remaining, session_seconds))
        started = time.perf_counter()
        try:
            outcome = _train_row(row, states[row.name], probe, console, plan.command[0], say)
        except Interrupted as e:
            if main:
                table.write(plan, probe, outcomes)
            raise Interrupted(f"{e}; continue with: {plan.resume_command()}") from None
        if outcome is not None:
            outcomes[row.name] = outcome
        session_seconds.append(time.perf_counter() - started)
        if main:
            table.write(plan, probe, outcomes)
    summary = table.write(plan, probe, outcomes) if main else table.collect(plan, probe, outcomes)
    if not any(r["status"] in ("done", "stopped") for r in summary["rows"]):
        raise UserError(f"no row trained: {summary['rows'][0]['reason']}")
    say(f"[bold green]done:[/] {len(plan.rows)} rows compared in {plan.output_dir / table.MARKDOWN_NAME}")
    return summary


def _train_row(row: Row, state: str, probe, console: Console, recipe_path: str, say) -> dict | None:
    """Train one row (`state`: "start" or "resume"). Returns the outcome of a row that failed; None where
    the row's report.json tells how it went (done, or stopped by a non-finite loss). Raises Interrupted on
    Ctrl-C (in training, the row saved a checkpoint first; before, there is nothing to keep)."""
    try:
        run(
            row.recipe,
            resume=state == "resume",
            overwrite=state == "start",
            console=console,
            recipe_path=recipe_path,
            on_trained=_probe_answer(probe[0], row) if probe else None,
        )
    except TrainingStopped as e:
        if e.exit_code == 130:
            raise Interrupted(f"row {row.name}: {str(e).split(';')[0]}") from None
        say(f"[yellow]row {row.name} stopped:[/] {e}")
    except KeyboardInterrupt:
        raise Interrupted(f"row {row.name}: interrupted") from None
    except UserError as e:  # the method refused this model or these settings: the other rows go on
        say(f"[red]row {row.name} failed:[/] {e}")
        return {"status": "failed", "reason": str(e)}
    return None


def _is_main_process() -> bool:
    """Process 0 of a multi-process launch, or the only process; it alone prints and writes the table."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def _row_states(plan: Plan, resume: bool, overwrite: bool) -> dict[str, str]:
    """Per row: "done" (has report.json), "resume" (has a checkpoint) or "start". Without --resume or
    --overwrite an existing comparison is refused; with --resume, a row trained from another recipe."""
    existing = [p.name for p in table.output_files(plan.output_dir) if p.exists()]
    existing += [f"{row.name}/" for row in plan.rows if _holds_run(plan.output_dir / row.name)]
    if overwrite and resume:
        raise UserError("--resume continues a comparison and --overwrite replaces it: give one of them")
    if overwrite:
        return {row.name: "start" for row in plan.rows}
    if not resume:
        if existing:
            raise UserError(
                f"output_dir {plan.output_dir} already holds a comparison ({', '.join(existing)}); "
                "continue it with --resume or replace it with --overwrite"
            )
        return {row.name: "start" for row in plan.rows}
    if not existing:
        raise UserError(f"--resume: no comparison under {plan.output_dir} to resume")
    states = {}
    for row in plan.rows:
        directory = plan.output_dir / row.name
        if report.read_report(directory) is not None:
            states[row.name] = "done"
        elif rundir.latest_checkpoint(directory) is not None:
            states[row.name] = "resume"
        else:
            states[row.name] = "start"
        if states[row.name] != "start":
            _check_same_recipe(row, directory)
    return states


def _holds_run(directory: Path) -> bool:
    return any((directory / marker).exists() for marker in rundir.RUN_MARKERS)


def _check_same_recipe(row: Row, directory: Path) -> None:
    """Refuse to mix in a row trained from another recipe than the one it would be trained from now."""
    saved = _flatten(read_run_recipe(directory / RECIPE_NAME).to_dict())
    planned = _flatten(row.recipe.to_dict())
    differing = sorted(k for k in saved.keys() | planned.keys() if saved.get(k) != planned.get(k))
    if differing:
        key = differing[0]
        raise UserError(
            f"--resume: {directory} was trained with {key}: {saved.get(key)!r}, the comparison now asks for "
            f"{planned.get(key)!r}; replace the comparison with --overwrite"
        )


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _row_heading(plan: Plan, index: int, remaining: int, session_seconds: list[float]) -> str:
    """`row 2/5: prefix-tuning (learning rate 0.01, method default) · about 6m 30s left for 4 rows`: the
    estimate is the mean time of the rows trained so far in this session times the `remaining` rows."""
    row = plan.rows[index]
    left = ""
    if session_seconds:
        estimate = report.format_duration(sum(session_seconds) / len(session_seconds) * remaining)
        left = f" · about {estimate} left for {remaining} row{'s' if remaining > 1 else ''}"
    rate = f"learning rate {row.recipe.train.learning_rate:g}, {row.learning_rate_source}"
    return f"\n[bold]row {index + 1}/{len(plan.rows)}: {row.name}[/] ({rate}){left}"


def _probe_answer(prompt: str, row: Row) -> Callable:
    """on_trained for train.run.run: the trained model's greedy answer to the probe prompt, for its
    report.json."""

    def answer(s) -> dict:
        model = s.accelerator.unwrap_model(s.model).eval()
        style = prompt_style(s.tokenizer, row.recipe.data.format, raw=False)
        text = complete(model, s.tokenizer, prompt, style, s.accelerator.device, PROBE_TOKENS)
        return {"probe": {"prompt": prompt, "answer": text}}

    return answer
