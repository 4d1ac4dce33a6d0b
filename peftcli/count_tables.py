"""The tables `peft count` prints: parameters per method, and the memory a training run's weights need."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from peftcli.report import format_bytes


def count_table(model_name: str, counts) -> Table:
    """`peft count`'s parameter table; a method that does not apply shows why."""
    table = Table(title=f"Parameters: {model_name}")
    columns = ["method", "trainable", "total", "trainable %"] + (
        ["not applicable"] if any(c.error for c in counts) else []
    )
    for column in columns:
        table.add_column(
            column, justify="right" if column in ("trainable", "total", "trainable %") else "left"
        )
    for c in counts:
        if c.error:
            table.add_row(c.method, "-", "-", "-", escape(c.error))
        else:
            cells = [c.method, f"{c.trainable:,}", f"{c.total:,}", f"{c.trainable_percent:.4f}"]
            table.add_row(*cells, *([""] if len(columns) > 4 else []))
    return table


def memory_table(counts, precision) -> Table:
    """`peft count`'s memory table: the frozen base at `precision`, the trained parameters with AdamW."""
    memory = Table(
        title="Memory of a training run's weights",
        caption=f"base: {precision.describe()}. Trained: fp32 master copies, gradients and AdamW's two "
        "moments (16 bytes a parameter). Activations come on top.",
    )
    for column in ("method", "frozen base", "trained + AdamW", "total"):
        memory.add_column(column, justify="left" if column == "method" else "right")
    for c in counts:
        if c.error:
            continue  # the method does not apply: the parameter table says why
        sizes = (c.frozen_bytes, c.trained_bytes, c.frozen_bytes + c.trained_bytes)
        memory.add_row(c.method, *(format_bytes(n) for n in sizes))
    return memory
