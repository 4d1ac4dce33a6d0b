import json
import sys
from pathlib import Path

import pytest

from peftcli import report
from peftcli.report import format_bytes, format_duration, peak_memory_bytes, reset_peak_memory, write_report


def make_summary(**overrides) -> dict:
    summary = {
        "method": "lora",
        "model": "tiny-llama",
        "task": "causal-lm",
        "recipe": "recipes/tiny.yaml",
        "adapter_dir": "runs/tiny",
        "params": {"trainable": 12_288, "total": 1_012_288, "trainable_percent": 1.213896},
        "steps": 30,
        "train_loss": {"first": 5.5, "last": 2.75},
        "eval": {
            "before": {"loss": 4.0, "perplexity": 54.598},
            "after": {"loss": 3.0, "perplexity": 20.0855},
        },
        "tokens_per_second": 1234.6,
        "peak_memory_bytes": 3 * 1024**3 // 2,
        "wall_seconds": 185.2,
    }
    summary.update(overrides)
    return summary


METRICS = [
    {"type": "eval", "step": 0, "loss": 4.0, "perplexity": 54.598},
    *[
        {"type": "train", "step": s, "loss": 5.5 - s * 0.1, "lr": 1e-4, "tokens_per_second": 1000.0}
        for s in range(1, 31)
    ],
    {"type": "eval", "step": 30, "loss": 3.0, "perplexity": 20.0855},
]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_writes_json_plot_and_markdown(tmp_path):
    summary = make_summary(seed=42)
    write_report(tmp_path, summary, METRICS)

    assert json.loads((tmp_path / "report.json").read_text()) == summary  # everything given, extras too
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# peftcli report: lora on `tiny-llama`")
    assert "| 12,288 | 1,012,288 | 1.2139 % |" in md
    assert "5.5000 → 2.7500 (-50.0 %)" in md
    assert "| loss | 4.0000 | 3.0000 | -25.0 % |" in md
    assert "| perplexity | 54.5980 | 20.0855 | -63.2 % |" in md
    assert "1,235 tokens/s" in md
    assert "1.5 GiB" in md
    assert "3m 05s" in md
    assert "![loss](loss.png)" in md
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files behind


def test_classification_accuracy_and_no_eval(tmp_path):
    evals = {"before": {"loss": 1.0, "accuracy": 0.5}, "after": {"loss": 0.5, "accuracy": 0.75}}
    write_report(tmp_path, make_summary(task="sequence-classification", eval=evals), METRICS)
    md = (tmp_path / "report.md").read_text()
    assert "| accuracy | 0.5000 | 0.7500 | +50.0 % |" in md
    assert "perplexity" not in md

    write_report(tmp_path, make_summary(eval={"before": None, "after": None}), [])
    md = (tmp_path / "report.md").read_text()
    assert "No evaluation was run" in md
    assert "![loss]" not in md and not (tmp_path / "loss.png").exists()  # the stale plot is gone


def test_missing_keys_are_named(tmp_path):
    summary = make_summary()
    del summary["params"]["total"]
    del summary["wall_seconds"]
    with pytest.raises(ValueError, match=r"params\.total, wall_seconds"):
        write_report(tmp_path, summary, METRICS)
    assert not (tmp_path / "report.json").exists()


def test_non_finite_values_give_strict_json(tmp_path):
    summary = make_summary(train_loss={"first": 5.5, "last": float("nan")})
    write_report(tmp_path, summary, METRICS)
    text = (tmp_path / "report.json").read_text()
    assert json.loads(text)["train_loss"]["last"] is None
    assert "NaN" not in text
    assert "5.5000 → nan (n/a)" in (tmp_path / "report.md").read_text()


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    write_report(tmp_path, make_summary(), METRICS)
    md = (tmp_path / "report.md").read_text()
    assert "matplotlib is not installed" in md
    assert "![loss]" not in md
    assert not (tmp_path / "loss.png").exists()
    assert (tmp_path / "report.json").is_file()


def test_plot_uses_train_and_eval_points():
    train = report._points(METRICS, "train")
    evals = report._points(METRICS, "eval")
    assert train[0] == list(range(1, 31)) and train[1][0] == pytest.approx(5.4)
    assert evals == ([0, 30], [4.0, 3.0])


def _png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width


def test_preference_metrics_in_the_markdown_and_beside_the_loss_plot(tmp_path):
    before = {
        "loss": 0.6931,
        "reward_margin": 0.0,
        "accuracy": 0.5,
        "chosen_logps": -40.0,
        "rejected_logps": -42.0,
    }
    after = {
        "loss": 0.2,
        "reward_margin": 2.5,
        "accuracy": 0.9375,
        "chosen_logps": -30.0,
        "rejected_logps": -60.0,
    }
    metrics = [
        {"type": "eval", "step": 0, **before},
        *[{"type": "train", "step": s, "loss": 0.7 - s * 0.01} for s in range(1, 31)],
        {"type": "eval", "step": 30, **after},
    ]
    write_report(tmp_path, make_summary(objective="dpo", eval={"before": before, "after": after}), metrics)
    md = (tmp_path / "report.md").read_text()
    assert "- **objective**: dpo" in md
    assert "| reward margin | 0.0000 | 2.5000 | n/a |" in md
    assert "| accuracy | 0.5000 | 0.9375 | +87.5 % |" in md
    assert "| rejected log-prob | -42.0000 | -60.0000 | -42.9 % |" in md
    assert report._points(metrics, "eval", "accuracy") == ([0, 30], [0.5, 0.9375])
    assert _png_width(tmp_path / "loss.png") == 1200  # the accuracy and margin panel beside the loss
    write_report(tmp_path, make_summary(), METRICS)
    assert _png_width(tmp_path / "loss.png") == 700


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 1024**3, "5.0 GiB"),
        (None, "n/a"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("s, text", [(4.25, "4.2 s"), (185.2, "3m 05s"), (7300, "2h 01m 40s"), (None, "n/a")])
def test_format_duration(s, text):
    assert format_duration(s) == text


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def _touch(mib: int) -> bytearray:
    ballast = bytearray(mib * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])
    return ballast


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_peak_memory_is_the_process_peak_rss():
    before = peak_memory_bytes()
    ballast = _touch(64)  # the peak cannot be below 64 MiB
    after = peak_memory_bytes()
    assert after >= before
    assert after >= 64 * 1024 * 1024
    assert after == _status_kib("VmHWM") * 1024
    del ballast


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs is Linux's")
def test_reset_starts_a_new_peak_that_counts_what_is_resident():
    ballast = _touch(256)
    del ballast  # freed: a large bytearray is unmapped at once
    high = peak_memory_bytes()
    reset_peak_memory()
    resident = _status_kib("VmRSS") * 1024
    assert peak_memory_bytes() < high - 200 * 1024 * 1024  # the freed 256 MiB no longer count
    assert peak_memory_bytes() >= resident - 16 * 1024 * 1024  # what is still resident does
    ballast = _touch(64)
    assert peak_memory_bytes() >= resident + 60 * 1024 * 1024
    del ballast
