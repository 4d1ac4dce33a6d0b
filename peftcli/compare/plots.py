"""The comparison's two plots, from compare.json's rows: every row's held-out eval loss against step on one
chart, and what each row cost (trainable parameters; peak memory) against its final eval result, with the
rows no other row beats on both (the Pareto front) joined by a line.

Drawn on a bare matplotlib Figure (no pyplot state), written atomically; without matplotlib each plot is
left out and its note says why (compare.md prints the note in its place).
"""

from __future__ import annotations

from pathlib import Path

from peftcli import fileio

CURVES_NAME = "eval_curves.png"
PARETO_NAME = "pareto.png"


def preload() -> None:
    """Import matplotlib now, if it is there: the first row would otherwise import it only after its peak
    (to draw its loss plot) while later rows hold it all along, which would flatter the first row's peak
    memory against the others' by matplotlib's footprint."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        pass


def write_plots(output_dir: Path, summary: dict) -> dict[str, str | None]:
    """{file name: None when written, else a one-line note}; stale plots are removed with a note."""
    trained = [r for r in summary["rows"] if r["status"] in ("done", "stopped")]
    curves = [r for r in trained if r["eval_curve"]]
    final = [r for r in trained if _result(r, summary["metric"]) is not None]
    notes = {
        CURVES_NAME: None if curves else "No row has held-out eval losses yet, so there is no curve plot.",
        PARETO_NAME: None if final else "No row has a final eval result yet, so there is no cost plot.",
    }
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        missing = "matplotlib is not installed, so there are no plots (pip install 'peftcli[plot]')."
        notes = {name: note or missing for name, note in notes.items()}
        Figure = FigureCanvasAgg = None  # noqa: N806
    for name, note in notes.items():
        if note:
            (output_dir / name).unlink(missing_ok=True)
    if not notes[CURVES_NAME]:
        fig = Figure(figsize=(7, 4.2), dpi=100)
        FigureCanvasAgg(fig)
        _draw_curves(fig.add_subplot(), curves)
        _save(fig, output_dir / CURVES_NAME)
    if not notes[PARETO_NAME]:
        fig = Figure(figsize=(11, 4.2), dpi=100)
        FigureCanvasAgg(fig)
        cost, memory = fig.subplots(1, 2)
        _draw_pareto(cost, final, summary["metric"], "trainable", "trainable parameters")
        _draw_pareto(memory, final, summary["metric"], "peak_memory_bytes", "peak memory (GiB)", 1024**3)
        _save(fig, output_dir / PARETO_NAME)
    return notes


def _result(row: dict, metric: str) -> float | None:
    value = (row.get("eval_after") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _draw_curves(ax, rows: list[dict]) -> None:
    for row in rows:
        steps, losses = zip(*row["eval_curve"], strict=True)
        ax.plot(steps, losses, marker="o", linewidth=1.5, label=row["row"])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out eval loss")
    ax.grid(True, alpha=0.3)
    ax.legend()


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (lower is better) and result, by cost."""
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if sign * points[i][1] < best:
            front.append(i)
            best = sign * points[i][1]
    return front


def _draw_pareto(ax, rows: list[dict], metric: str, key: str, label: str, scale: float = 1.0) -> None:
    points = [(row[key] / scale, _result(row, metric)) for row in rows]
    ax.scatter([x for x, _ in points], [y for _, y in points], zorder=3)
    for (x, y), row in zip(points, rows, strict=True):
        ax.annotate(row["row"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front(points, higher_is_better=metric == "accuracy")
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], linestyle="--", alpha=0.6)
    if key == "trainable" and min(x for x, _ in points) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel(f"eval {metric} after training")
    ax.grid(True, alpha=0.3)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
