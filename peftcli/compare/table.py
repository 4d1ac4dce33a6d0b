"""compare.json and compare.md: one row per trained method, every number read from that row's own report.json
(and its eval curve from its metrics.jsonl), so the table says exactly what each run says of itself.

A row is `done` (trained to the end), `stopped` (a non-finite loss ended it early: its report says so),
`failed` (the method refused this model or its settings, with the reason) or `pending` (not trained yet: an
interrupted comparison). Methods that do not apply to the model are listed apart, with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from peftcli import fileio
from peftcli.compare import plots
from peftcli.report import format_bytes, format_duration, read_report

if TYPE_CHECKING:
    from peftcli.compare.plan import Plan

JSON_NAME = "compare.json"
MARKDOWN_NAME = "compare.md"


def output_files(output_dir: Path) -> list[Path]:
    """What a comparison writes at the top of its output dir (each row writes its own directory)."""
    return [output_dir / name for name in (JSON_NAME, MARKDOWN_NAME, plots.CURVES_NAME, plots.PARETO_NAME)]


def collect(plan: Plan, probe: tuple[str, str] | None, outcomes: dict[str, dict]) -> dict:
    """compare.json's content. `outcomes`: row name -> {"status": "failed", "reason"} for rows that raised."""
    recipe = plan.recipe
    metric = "accuracy" if recipe.model.task == "sequence-classification" else "loss"
    return {
        "model": recipe.model.name,
        "task": recipe.model.task,
        "data": recipe.data.train,
        "budget": {
            "max_steps": recipe.train.max_steps,
            "epochs": recipe.train.epochs,
            "batch_size": recipe.train.batch_size,
            "gradient_accumulation": recipe.train.gradient_accumulation,
            "seed": recipe.train.seed,
        },
        "metric": metric,
        "probe": {"prompt": probe[0], "reference": probe[1]} if probe else None,
        "rows": [_row(plan, row, outcomes.get(row.name)) for row in plan.rows],
        "not_applicable": [{"row": name, "reason": why} for name, why in plan.skipped],
    }


def _row(plan: Plan, row, outcome: dict | None) -> dict:
    directory = plan.output_dir / row.name
    entry = {
        "row": row.name,
        "method": row.recipe.method.name,
        "settings": dict(row.spec.settings),
        "learning_rate": row.recipe.train.learning_rate,
        "learning_rate_source": row.learning_rate_source,
        "run_dir": str(directory),
    }
    summary = read_report(directory)
    if summary is None:
        return {**entry, "status": "pending", "reason": None, **(outcome or {})}
    evals = summary.get("eval") or {}
    return {
        **entry,
        "status": "stopped" if summary.get("stopped") else "done",
        "reason": summary.get("stopped"),
        "learning_rate": summary.get("learning_rate", entry["learning_rate"]),
        "steps": summary["steps"],
        "trainable": summary["params"]["trainable"],
        "total": summary["params"]["total"],
        "trainable_percent": summary["params"]["trainable_percent"],
        "adapter_bytes": summary.get("adapter_bytes"),
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "tokens_per_second": summary["tokens_per_second"],
        "wall_seconds": summary["wall_seconds"],
        "eval_before": evals.get("before"),
        "eval_after": evals.get("after"),
        "probe_answer": (summary.get("probe") or {}).get("answer"),
        "eval_curve": _eval_curve(directory / "metrics.jsonl"),
    }


def _eval_curve(path: Path) -> list[list[float]]:
    """[[step, eval loss], ...] from a run's metrics.jsonl."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [[r["step"], r["loss"]] for r in records if r.get("type") == "eval" and r.get("loss") is not None]


def write(plan: Plan, probe: tuple[str, str] | None, outcomes: dict[str, dict]) -> dict:
    """Write compare.json, the plots and compare.md into the plan's output dir; returns compare.json's
    content."""
    summary = collect(plan, probe, outcomes)
    out = plan.output_dir
    fileio.write_json(out / JSON_NAME, summary)
    notes = plots.write_plots(out, summary)
    fileio.write_text(out / MARKDOWN_NAME, render_markdown(summary, notes))
    return summary


# --------------------------------------------------------------------------------------------------
# compare.md


def _metric(values: dict | None, name: str) -> str:
    value = (values or {}).get(name)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def _before_after(row: dict, name: str) -> str:
    return f"{_metric(row.get('eval_before'), name)} → {_metric(row.get('eval_after'), name)}"


def table_lines(summary: dict) -> list[str]:
    """The Markdown table: one line per row, its numbers formatted from compare.json (which holds the
    row's report.json numbers)."""
    accuracy = summary["metric"] == "accuracy"
    header = "| row | learning rate | trainable | % of total | adapter on disk | peak memory | tokens/s "
    header += "| wall time | eval loss before → after |" + (" accuracy before → after |" if accuracy else "")
    lines = [header, "|---" + "|---:" * (8 + accuracy) + "|"]
    for row in summary["rows"]:
        rate = f"{row['learning_rate']:g} ({row['learning_rate_source']})"
        if row["status"] in ("pending", "failed"):
            cells = [row["row"], rate, *([row["status"]] + ["—"] * (6 + accuracy))]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [
            row["row"] + (" (stopped)" if row["status"] == "stopped" else ""),
            rate,
            f"{row['trainable']:,}",
            f"{row['trainable_percent']:.4f} %",
            format_bytes(row["adapter_bytes"]),
            format_bytes(row["peak_memory_bytes"]),
            f"{row['tokens_per_second']:,.0f}",
            format_duration(row["wall_seconds"]),
            _before_after(row, "loss"),
        ]
        if accuracy:
            cells.append(_before_after(row, "accuracy"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(summary: dict, plot_notes: dict[str, str | None]) -> str:
    budget = summary["budget"]
    steps = f"{budget['max_steps']} steps" if budget["max_steps"] else f"{budget['epochs'] or 1} epochs"
    lines = [
        f"# peftcli comparison on `{summary['model']}`",
        "",
        f"{summary['task']} on `{summary['data']}`: {steps} of batch {budget['batch_size']}"
        f" x {budget['gradient_accumulation']} accumulation, seed {budget['seed']}, for every row. Each row"
        " is a run directory of its own (report.json, adapter, metrics); the numbers below are theirs.",
        "",
        *table_lines(summary),
    ]
    unusual = [r for r in summary["rows"] if r["status"] in ("failed", "stopped") and r.get("reason")]
    if unusual or summary["not_applicable"]:
        lines += [""]
        lines += [f"- **{r['row']}** {r['status']}: {r['reason']}" for r in unusual]
        lines += [f"- **{r['row']}** does not apply: {r['reason']}" for r in summary["not_applicable"]]
    for title, name in (
        ("Held-out eval loss", plots.CURVES_NAME),
        ("Cost against result", plots.PARETO_NAME),
    ):
        lines += ["", f"## {title}", "", plot_notes.get(name) or f"![{title}]({name})"]
    if summary["probe"]:
        lines += _probe_lines(summary)
    return "\n".join(lines) + "\n"


def _cell(text: str | None) -> str:
    return (text or "—").replace("|", "\\|").replace("\n", " ")


def _probe_lines(summary: dict) -> list[str]:
    probe = summary["probe"]
    lines = [
        "",
        "## Answers to a validation prompt",
        "",
        f"Prompt: {_cell(probe['prompt'])}",
        "",
        f"Reference: {_cell(probe['reference'])}",
        "",
        "| row | answer (greedy) |",
        "|---|---|",
    ]
    lines += [f"| {r['row']} | {_cell(r.get('probe_answer'))} |" for r in summary["rows"]]
    return lines
