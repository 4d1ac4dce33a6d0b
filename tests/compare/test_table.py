"""peftcli/compare/table.py and plots.py: the Markdown table's rows of every status, the probe answers, the
Pareto front, and the plots' notes when they cannot be drawn. From hand-made compare.json contents."""

from __future__ import annotations

import builtins

import pytest

from peftcli.compare import plots
from peftcli.compare.table import render_markdown, table_lines


def _row(name: str, status: str = "done", **fields) -> dict:
    row = {"row": name, "status": status, "learning_rate": 2e-4, "learning_rate_source": "method default"}
    if status in ("done", "stopped"):
        row.update(
            trainable=1234,
            trainable_percent=1.5,
            adapter_bytes=4096,
            peak_memory_bytes=3 * 1024**3,
            tokens_per_second=117.4,
            wall_seconds=125.0,
            eval_before={"loss": 3.5},
            eval_after={"loss": 0.25},
            eval_curve=[[0, 3.5], [2, 0.25]],
            probe_answer="a | b\nc",
        )
    return {**row, **fields}


def _summary(rows: list[dict], metric: str = "loss") -> dict:
    return {
        "model": "m",
        "task": "causal-lm",
        "data": "d.jsonl",
        "budget": {"max_steps": 40, "epochs": None, "batch_size": 4, "gradient_accumulation": 1, "seed": 42},
        "metric": metric,
        "probe": {"prompt": "Where?", "reference": "There."},
        "rows": rows,
        "not_applicable": [{"row": "bitfit", "reason": "no biases"}],
    }


def test_rows_of_every_status_fill_every_column():
    rows = [
        _row("lora"),
        _row("prompt-tuning", "stopped", reason="non-finite loss"),
        _row("adapter", "pending"),
    ]
    rows.append(_row("prefix-tuning", "failed", reason="refuses checkpointing", learning_rate=1e-2))
    lines = table_lines(_summary(rows))
    assert len({line.count("|") for line in lines}) == 1  # every line has every column
    assert lines[2] == (
        "| lora | 0.0002 (method default) | 1,234 | 1.5000 % | 4.0 KiB | 3.0 GiB | 117 | 2m 05s "
        "| 3.5000 → 0.2500 |"
    )
    assert lines[3].startswith("| prompt-tuning (stopped) |")
    assert lines[4] == "| adapter | 0.0002 (method default) | pending | — | — | — | — | — | — |"
    assert lines[5].startswith("| prefix-tuning | 0.01 (method default) | failed | —")


def test_markdown_lists_the_reasons_and_escapes_the_answers():
    rows = [_row("lora"), _row("prefix-tuning", "failed", reason="refuses checkpointing")]
    text = render_markdown(_summary(rows), {plots.CURVES_NAME: None, plots.PARETO_NAME: "no plot: why"})
    assert "- **prefix-tuning** failed: refuses checkpointing" in text
    assert "- **bitfit** does not apply: no biases" in text
    assert "![Held-out eval loss](eval_curves.png)" in text and "no plot: why" in text
    assert "| lora | a \\| b c |" in text and "| prefix-tuning | — |" in text
    assert "40 steps of batch 4 x 1 accumulation, seed 42" in text


@pytest.mark.parametrize(
    ("points", "higher_is_better", "front"),
    [
        ([(1, 3.0), (2, 2.0), (3, 2.5), (4, 1.0)], False, [0, 1, 3]),
        ([(1, 0.5), (2, 0.9), (3, 0.8), (2, 0.4)], True, [0, 1]),
        ([(5, 1.0), (5, 0.5), (1, 2.0)], False, [2, 1]),
    ],
)
def test_the_pareto_front_is_the_rows_nothing_beats_on_both(points, higher_is_better, front):
    assert plots.pareto_front(points, higher_is_better) == front


def test_without_matplotlib_the_plots_are_notes_and_stale_ones_go(tmp_path, monkeypatch):
    (tmp_path / plots.PARETO_NAME).write_bytes(b"old")
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    notes = plots.write_plots(tmp_path, _summary([_row("lora")]))
    assert all("matplotlib is not installed" in note for note in notes.values())
    assert not (tmp_path / plots.PARETO_NAME).exists()


def test_rows_without_results_give_notes_not_empty_plots(tmp_path):
    notes = plots.write_plots(tmp_path, _summary([_row("lora", "pending")]))
    assert notes[plots.CURVES_NAME].startswith("No row has held-out eval losses")
    assert notes[plots.PARETO_NAME].startswith("No row has a final eval result")
    assert not list(tmp_path.iterdir())
