"""The end-of-run report: report.json (the summary as given), loss.png and a human report.md.

The training loop gathers the numbers; this module only checks, formats and writes them, so the
loop stays free of plotting and Markdown. Every file is written atomically.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from peftcli import fileio

# Key paths the training loop must fill in; a value may be None where it does not apply
# (e.g. eval.before with no validation set), but the key itself must be there.
REQUIRED_KEYS: tuple[str, ...] = (
    "method",
    "params.trainable",
    "params.total",
    "params.trainable_percent",
    "steps",
    "train_loss.first",
    "train_loss.last",
    "eval.before",
    "eval.after",
    "tokens_per_second",
    "peak_memory_bytes",
    "wall_seconds",
)

PLOT_NAME = "loss.png"
# Eval metrics as report.md names them (others by their key); the preference objectives' are plotted too.
METRIC_NAMES = {
    "reward_margin": "reward margin",
    "accuracy": "accuracy",
    "chosen_logps": "chosen log-prob",
    "rejected_logps": "rejected log-prob",
    "kl": "KL estimate",
}
PREFERENCE_METRICS = ("accuracy", "reward_margin")


def write_report(output_dir: Path, summary: dict, metrics: list[dict]) -> None:
    """Write report.json, loss.png and report.md into `output_dir`.

    `summary` holds at least REQUIRED_KEYS; `metrics` are the lines of metrics.jsonl:
    ``{"type": "train", "step", "loss", ...}`` and ``{"type": "eval", "step", "loss", ...}``.
    Without matplotlib the plot is left out and report.md says so.
    """
    missing = _missing_keys(summary)
    if missing:
        raise ValueError(f"report summary lacks {', '.join(missing)}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fileio.write_text(output_dir / "report.json", json.dumps(_jsonable(summary), indent=2) + "\n")
    plot_note = write_loss_plot(output_dir / PLOT_NAME, metrics)
    fileio.write_text(output_dir / "report.md", render_markdown(summary, plot_note))


def read_report(output_dir: Path) -> dict | None:
    """A run's report.json, or None where there is none or it is not a whole one (cut short, not JSON, or
    lacking REQUIRED_KEYS): a run without a readable report has not finished."""
    try:
        summary = json.loads((Path(output_dir) / "report.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) and not _missing_keys(summary) else None


def _missing_keys(summary: dict) -> list[str]:
    missing = []
    for path in REQUIRED_KEYS:
        node = summary
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(path)
                break
            node = node[part]
    return missing


def _jsonable(value):
    """Strict JSON: NaN/inf become null (json.dumps would write bare NaN); paths and the like, strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        return _jsonable(value.item())
    return str(value)


# --------------------------------------------------------------------------------------------------
# The plot


def _points(metrics: list[dict], kind: str, key: str = "loss") -> tuple[list[float], list[float]]:
    steps, values = [], []
    for line in metrics:
        value = line.get(key)
        if line.get("type") == kind and line.get("step") is not None and _is_number(value):
            steps.append(line["step"])
            values.append(float(value))
    return steps, values


def write_loss_plot(path: Path, metrics: list[dict]) -> str | None:
    """Train loss per logged step and eval loss per eval, against step; beside it, for the preference
    objectives, the eval's preference accuracy and reward margin. Returns None when the plot was written,
    else a one-line note saying why not (a stale plot is removed)."""
    train_steps, train_losses = _points(metrics, "train")
    eval_steps, eval_losses = _points(metrics, "eval")
    note = None
    if not train_losses and not eval_losses:
        note = "No loss values were logged, so there is no loss plot."
    else:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            note = "matplotlib is not installed, so there is no loss plot (pip install 'peftcli[plot]')."
    if note:
        Path(path).unlink(missing_ok=True)
        return note
    # A bare Figure on the Agg canvas: no pyplot global state, no GUI backend, safe in threads.
    preference = any(line.get("type") == "eval" and "reward_margin" in line for line in metrics)
    fig = Figure(figsize=(12 if preference else 7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if preference else 1, 1)
    if train_losses:
        ax.plot(train_steps, train_losses, label="train loss", linewidth=1.2)
    if eval_losses:
        ax.plot(eval_steps, eval_losses, label="eval loss", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if preference:
        _plot_preference(fig.add_subplot(1, 2, 2), metrics)
    fig.tight_layout()
    fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return None


def _plot_preference(ax, metrics: list[dict]) -> None:
    """Eval preference accuracy (left axis, 0 to 1) and reward margin (right axis) against step."""
    steps, accuracy = _points(metrics, "eval", "accuracy")
    ax.plot(steps, accuracy, label="preference accuracy", marker="o", color="tab:green")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    margin_ax = ax.twinx()
    steps, margins = _points(metrics, "eval", "reward_margin")
    margin_ax.plot(steps, margins, label="reward margin", marker="s", color="tab:purple")
    margin_ax.set_ylabel("reward margin")
    lines = ax.get_lines() + margin_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")


# --------------------------------------------------------------------------------------------------
# report.md


def _precision_lines(precision: dict | None) -> list[str]:
    """The base's dtype and storage, and why (report.json's `precision`, where the run recorded it)."""
    if not precision:
        return []
    storage = precision["quantize"]
    layers = ", ".join(f"{count} {fmt}" for fmt, count in (precision.get("quantized_layers") or {}).items())
    return [
        f"- **base dtype**: {precision['dtype']} ({precision['dtype_reason']})",
        f"- **frozen weights**: {storage if storage != 'none' else 'unquantized'}"
        f" ({precision['quantize_reason']}{'; ' + layers if layers else ''}),"
        f" {format_bytes(precision['frozen_bytes'])} resident",
        f"- **trained parameters**: {precision['trainable_dtype']}",
    ]


def render_markdown(summary: dict, plot_note: str | None = None) -> str:
    params, train_loss, evals = summary["params"], summary["train_loss"], summary["eval"] or {}
    title = f"# peftcli report: {summary['method']}"
    if summary.get("model"):
        title += f" on `{summary['model']}`"
    lines = [title, ""]
    for key in ("model", "method", "objective", "task", "recipe", "adapter_dir"):
        if summary.get(key) is not None:
            value = summary[key] if key in ("method", "objective", "task") else f"`{summary[key]}`"
            lines.append(f"- **{key.replace('_', ' ')}**: {value}")
    lines += [
        "",
        "## Parameters",
        "",
        "| trainable | total | trainable % |",
        "|---:|---:|---:|",
        f"| {_int(params['trainable'])} | {_int(params['total'])} "
        f"| {_num(params['trainable_percent'], 4)} % |",
        "",
        "## Training",
        "",
        f"- **steps**: {_int(summary['steps'])}",
        f"- **train loss**: {_num(train_loss['first'])} → {_num(train_loss['last'])}"
        f" ({_change(train_loss['first'], train_loss['last'])})",
        f"- **throughput**: {_int(summary['tokens_per_second'])} tokens/s",
        f"- **peak memory**: {format_bytes(summary['peak_memory_bytes'])}",
        f"- **adapter on disk**: {format_bytes(summary.get('adapter_bytes'))}",
        f"- **wall time**: {format_duration(summary['wall_seconds'])}",
        *_precision_lines(summary.get("precision")),
        "",
        "## Evaluation",
        "",
    ]
    before, after = evals.get("before") or {}, evals.get("after") or {}
    names = [k for k in ("loss", "perplexity", "accuracy") if k in before or k in after]
    names += [k for k in {**before, **after} if k not in names and _is_number(before.get(k, after.get(k)))]
    if names:
        lines += ["| metric | before | after | change |", "|---|---:|---:|---:|"]
        for name in names:
            old, new = before.get(name), after.get(name)
            lines.append(
                f"| {METRIC_NAMES.get(name, name)} | {_num(old)} | {_num(new)} | {_change(old, new)} |"
            )
    else:
        lines.append("No evaluation was run (no validation set).")
    lines += ["", "## Loss", ""]
    lines.append(plot_note if plot_note else f"![loss]({PLOT_NAME})")
    return "\n".join(lines) + "\n"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value, digits: int = 4) -> str:
    if not _is_number(value):
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _int(value) -> str:
    return f"{round(value):,}" if _is_number(value) and math.isfinite(value) else "n/a"


def _change(old, new) -> str:
    """Relative change, signed: '-12.3 %'."""
    if not (_is_number(old) and _is_number(new)) or old == 0 or not math.isfinite(old - new):
        return "n/a"
    return f"{100.0 * (new - old) / abs(old):+.1f} %"


# --------------------------------------------------------------------------------------------------
# Units


def format_bytes(n: int | float | None) -> str:
    """Binary units: 1536 -> '1.5 KiB'."""
    if not _is_number(n) or n < 0:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float | None) -> str:
    """'42.0 s', '3m 05s', '2h 01m 40s'."""
    if not _is_number(seconds) or seconds < 0:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def peak_memory_bytes() -> int:
    """Peak memory since the last `reset_peak_memory` (else since the process started): CUDA's max
    allocated bytes when a GPU is in use, else the peak resident set size (0 where the platform cannot say).

    On Linux the resident peak is VmHWM, which belongs to the address space this process's exec made
    and which `reset_peak_memory` can lower; getrusage's ru_maxrss (the fallback elsewhere) can neither be
    reset nor separated from the peak of the parent that spawned us (vfork + exec carries it over).
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    high_water = _proc_status_bytes("VmHWM")
    if high_water is not None:
        return high_water
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def reset_peak_memory() -> None:
    """Start a new peak: what `peak_memory_bytes` reports from now on is this stretch's alone, so several
    runs in one process (`peft compare`) each report their own.

    Garbage is collected and glibc's heap trimmed first, so that what an earlier run freed is not still
    resident; then the kernel's high-water mark is set to the resident size now (/proc/self/clear_refs,
    "5"), or CUDA's peak statistics are reset. Where neither exists this does nothing.
    """
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _proc_status_bytes(field: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes (VmHWM, VmRSS), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
