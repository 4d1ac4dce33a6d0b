"""`peft compare` end to end on tiny models: the table is the rows' own reports, each row an ordinary run with
its own peak memory, resume row by row, Ctrl-C, rows that fail or stop, classification, two processes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from tiny import launch_two_processes
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.compare import run as compare_run
from peftcli.compare.plan import make_plan
from peftcli.compare.run import Interrupted
from peftcli.compare.run import compare as compare_plan
from peftcli.compare.table import table_lines
from peftcli.errors import UserError
from peftcli.infer import run_generate
from peftcli.report import format_bytes, format_duration
from peftcli.train import loop
from peftcli.train.run import TrainingStopped

ROOT = Path(__file__).resolve().parents[2]


def _quiet() -> tuple[Console, io.StringIO]:
    text = io.StringIO()
    return Console(file=text, width=200), text


def compare(recipe: Path, set_overrides: list[str], method_flags: list[str], **kwargs) -> dict:
    """What `peft compare RECIPE --set ... --method ...` runs."""
    return compare_plan(make_plan(recipe, set_overrides, method_flags), **kwargs)


def _report(out: Path, row: str) -> dict:
    return json.loads((out / row / "report.json").read_text())


def _expected_line(report: dict, row: str, source: str) -> str:
    """The table line compare.md must hold, formatted here from the row's report.json alone."""
    before, after = report["eval"]["before"]["loss"], report["eval"]["after"]["loss"]
    cells = [
        row,
        f"{report['learning_rate']:g} ({source})",
        f"{report['params']['trainable']:,}",
        f"{report['params']['trainable_percent']:.4f} %",
        format_bytes(report["adapter_bytes"]),
        format_bytes(report["peak_memory_bytes"]),
        f"{report['tokens_per_second']:,.0f}",
        format_duration(report["wall_seconds"]),
        f"{before:.4f} → {after:.4f}",
    ]
    return "| " + " | ".join(cells) + " |"


def test_every_number_in_the_table_is_the_rows_own_report(tmp_path, bases, write_recipe):
    recipe = write_recipe(bases["llama"])
    console, text = _quiet()
    summary = compare(recipe, [], ["lora", "prompt-tuning", "bitfit"], console=console)
    assert "not compared: bitfit: " in text.getvalue()
    assert "row 2/2: prompt-tuning (learning rate 0.03, method default) · about " in text.getvalue()
    assert " left for 1 row\n" in text.getvalue()
    out = tmp_path / "out"
    saved = json.loads((out / "compare.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert [r["row"] for r in saved["rows"]] == ["lora", "prompt-tuning"]
    assert saved["not_applicable"][0]["row"] == "bitfit" and "bias" in saved["not_applicable"][0]["reason"]
    markdown = (out / "compare.md").read_text()
    for row in saved["rows"]:
        report = _report(out, row["row"])
        assert row["status"] == "done" and row["steps"] == report["steps"] == 2
        assert (row["trainable"], row["total"], row["trainable_percent"]) == tuple(
            report["params"][k] for k in ("trainable", "total", "trainable_percent")
        )
        for key in (
            "adapter_bytes",
            "peak_memory_bytes",
            "tokens_per_second",
            "wall_seconds",
            "learning_rate",
        ):
            assert row[key] == report[key], key
        assert (row["eval_before"], row["eval_after"]) == (report["eval"]["before"], report["eval"]["after"])
        assert row["adapter_bytes"] == sum(
            (out / row["row"] / name).stat().st_size
            for name in ("adapter_model.safetensors", "adapter_config.json")
        )
        metrics = [json.loads(line) for line in (out / row["row"] / "metrics.jsonl").read_text().splitlines()]
        assert row["eval_curve"] == [[m["step"], m["loss"]] for m in metrics if m["type"] == "eval"]
        assert [step for step, _ in row["eval_curve"]] == [0, 1, 2]
        assert _expected_line(report, row["row"], "method default") in markdown.splitlines()
        # the probe answer is the row's run dir's own: generating from it afresh gives the same text
        assert row["probe_answer"] == report["probe"]["answer"]
        assert run_generate(out / row["row"], saved["probe"]["prompt"]) == row["probe_answer"]
    assert saved["probe"]["prompt"].startswith("What is ") and saved["probe"]["reference"].startswith(
        "It is "
    )
    assert "bitfit** does not apply" in markdown and "## Answers to a validation prompt" in markdown
    for plot in ("eval_curves.png", "pareto.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot})" in markdown


def test_each_row_reports_its_own_peak_memory(tmp_path, bases, write_recipe, monkeypatch):
    """A 300 MiB ballast held during the first row only must not show in the second row's peak."""
    real_fit, calls = loop.fit, []

    def fit_with_ballast(s, log, save):
        calls.append(s.recipe.method.name)
        ballast = bytearray(300 * 1024 * 1024) if len(calls) == 1 else bytearray()
        ballast[::4096] = b"x" * len(ballast[::4096])
        try:
            return real_fit(s, log, save)
        finally:
            del ballast

    monkeypatch.setattr("peftcli.train.run.fit", fit_with_ballast)
    recipe = write_recipe(bases["gpt2"], max_steps=1, eval_every=None)
    compare(recipe, [], ["lora", "lora:dropout=0.0"], console=_quiet()[0])
    first, second = (
        _report(tmp_path / "out", row)["peak_memory_bytes"] for row in ("lora", "lora-dropout0.0")
    )
    assert first - second > 250 * 1024 * 1024, (first, second)


def test_resume_continues_row_by_row_and_never_mixes_in_another_recipe(
    tmp_path, bases, write_recipe, monkeypatch
):
    recipe = write_recipe(bases["gpt2"], save_every=1, eval_every=None)
    rows, out = ["lora", "prompt-tuning"], tmp_path / "out"
    real_run = compare_run.run

    def interrupted_in_the_second_row(row_recipe, **kwargs):
        if row_recipe.method.name == "prompt-tuning":
            raise TrainingStopped(
                "interrupted at step 1; checkpoint saved. Continue with: ...", exit_code=130
            )
        return real_run(row_recipe, **kwargs)

    monkeypatch.setattr(compare_run, "run", interrupted_in_the_second_row)
    with pytest.raises(Interrupted) as info:
        compare(recipe, ["train.seed=0"], rows, console=_quiet()[0])
    assert info.value.exit_code == 130
    assert f"peft compare {recipe} --method lora --method prompt-tuning --set train.seed=0 --resume" in str(
        info.value
    )
    statuses = [r["status"] for r in json.loads((out / "compare.json").read_text())["rows"]]
    assert statuses == ["done", "pending"]
    monkeypatch.setattr(compare_run, "run", real_run)
    lora_report = (out / "lora" / "report.json").read_bytes()

    console, text = _quiet()
    compare(recipe, ["train.seed=0"], rows, resume=True, console=console)
    assert "row 1/2: lora: done already, not retrained" in text.getvalue()
    assert (out / "lora" / "report.json").read_bytes() == lora_report
    # the second row died after its step-1 checkpoint: --resume continues it from there
    (out / "prompt-tuning" / "report.json").unlink()
    shutil.rmtree(out / "prompt-tuning" / "checkpoints" / "step-2")
    console, text = _quiet()
    compare(recipe, [], rows, resume=True, console=console)
    assert "resuming from" in text.getvalue() and "step 1 of 2" in text.getvalue()
    assert (out / "lora" / "report.json").read_bytes() == lora_report
    assert [r["status"] for r in json.loads((out / "compare.json").read_text())["rows"]] == ["done", "done"]

    # a report cut short is no report: that row continues from its checkpoint, the finished one stays
    (out / "prompt-tuning" / "report.json").write_text('{"method": "prompt-tuning", ')
    console, text = _quiet()
    compare(recipe, [], rows, resume=True, console=console)
    assert "resuming from" in text.getvalue() and json.loads(
        (out / "prompt-tuning" / "report.json").read_text()
    )
    assert (out / "lora" / "report.json").read_bytes() == lora_report

    with pytest.raises(UserError, match="already holds a comparison .*--resume .*--overwrite"):
        compare(recipe, [], rows, console=_quiet()[0])
    with pytest.raises(
        UserError, match=r"lora was trained with train.seed: 0, the comparison now asks for 1"
    ):
        compare(recipe, ["train.seed=1"], rows, resume=True, console=_quiet()[0])
    with pytest.raises(UserError, match="give one of them"):
        compare(recipe, [], rows, resume=True, overwrite=True, console=_quiet()[0])
    with pytest.raises(UserError, match="--resume: no comparison under"):
        compare(recipe, [f"output_dir={tmp_path / 'none'}"], rows, resume=True, console=_quiet()[0])
    compare(recipe, ["train.seed=1"], rows[:1], overwrite=True, console=_quiet()[0])
    assert (out / "lora" / "report.json").read_bytes() != lora_report


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (KeyboardInterrupt(), Interrupted("row lora: interrupted")),
        (
            TrainingStopped("interrupted at step 3; checkpoint saved. ...", 130),
            Interrupted("row lora: interrupted at step 3"),
        ),
        (
            UserError("prefix tuning refuses this"),
            {"status": "failed", "reason": "prefix tuning refuses this"},
        ),
        (TrainingStopped("training stopped: non-finite loss"), None),  # its report.json says so
    ],
)
def test_how_a_row_ends_decides_whether_the_comparison_goes_on(
    bases, write_recipe, monkeypatch, raised, expected
):
    def ends(*args, **kwargs):
        raise raised

    monkeypatch.setattr(compare_run, "run", ends)
    row = make_plan(write_recipe(bases["gpt2"]), [], ["lora"]).rows[0]
    if isinstance(expected, Interrupted):
        with pytest.raises(Interrupted, match=str(expected)) as info:
            compare_run._train_row(row, "start", None, _quiet()[0], "recipe.yaml", print)
        assert info.value.exit_code == 130
    else:
        assert (
            compare_run._train_row(row, "start", None, _quiet()[0], "recipe.yaml", lambda *a: None)
            == expected
        )


def test_without_validation_data_the_table_says_so(tmp_path, bases, write_recipe):
    recipe = write_recipe(bases["gpt2"], max_steps=1)
    summary = compare(recipe, ["data.validation=null"], ["lora"], console=_quiet()[0])
    assert summary["probe"] is None and summary["rows"][0]["eval_curve"] == []
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert "| n/a → n/a |" in markdown and "No row has held-out eval losses yet" in markdown


def test_a_row_that_fails_or_stops_is_listed_and_the_others_go_on(tmp_path, bases, write_recipe, monkeypatch):
    real_make = loop.make_objective

    def nan_for_adapters(recipe, speedups, reduce):  # the training loss only: evals stay finite
        objective = real_make(recipe, speedups, reduce)
        if recipe.method.name == "adapter":
            real_loss = objective.loss
            objective.loss = lambda model, batch, totals: real_loss(model, batch, totals) * float("nan")
        return objective

    monkeypatch.setattr(loop, "make_objective", nan_for_adapters)
    # prefix tuning refuses activation checkpointing: that row fails with the reason, the others train
    recipe = write_recipe(bases["llama"], gradient_checkpointing=True)
    summary = compare(recipe, [], ["lora", "prefix-tuning", "adapter"], console=_quiet()[0])
    lora, prefix, adapter = summary["rows"]
    assert lora["status"] == "done"
    assert prefix["status"] == "failed" and "checkpointing" in prefix["reason"]
    assert adapter["status"] == "stopped" and "non-finite loss" in adapter["reason"]
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert "| prefix-tuning | 0.01 (method default) | failed | —" in markdown
    assert "- **prefix-tuning** failed: " in markdown and "- **adapter** stopped: non-finite loss" in markdown
    with pytest.raises(UserError, match="no row trained: .*checkpointing"):
        compare(recipe, [f"output_dir={tmp_path / 'other'}"], ["prefix-tuning"], console=_quiet()[0])


def test_classification_compares_accuracy_without_a_probe(tmp_path, bases, write_recipe):
    recipe = write_recipe(bases["bert"], classify=True)
    result = CliRunner().invoke(app, ["compare", str(recipe), "--method", "lora", "--method", "bitfit"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    summary = json.loads((out / "compare.json").read_text())
    assert summary["metric"] == "accuracy" and summary["probe"] is None
    markdown = (out / "compare.md").read_text()
    assert "| accuracy before → after |" in markdown.splitlines()[4] and "validation prompt" not in markdown
    for row in summary["rows"]:
        report = _report(out, row["row"])
        accuracy = f"{report['eval']['before']['accuracy']:.4f} → {report['eval']['after']['accuracy']:.4f}"
        assert _expected_line(report, row["row"], "method default")[
            :-1
        ] + "| " + accuracy + " |" in table_lines(summary)
    assert (out / "pareto.png").is_file()


def test_the_command_refuses_bad_flags_in_one_line(tmp_path, bases, write_recipe):
    recipe = write_recipe(bases["gpt2"])
    result = subprocess.run(
        [sys.executable, "-m", "peftcli.cli", "compare", str(recipe), "--method", "lora:rank=0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --method lora:rank=0: method.rank: must be > 0, got 0"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_processes_train_every_row_as_one_process_does(tmp_path, bases, write_recipe):
    """accelerate launch, 2 CPU processes at batch 2: every row runs on both and learns what one process at
    batch 4 learns."""
    recipe = write_recipe(bases["llama"], batch_size=4)
    compare(recipe, [], ["lora", "prompt-tuning"], console=_quiet()[0])
    two = subprocess.run(
        launch_two_processes("compare", str(recipe), "--method", "lora", "--method", "prompt-tuning")
        + ["--set", "train.batch_size=2", "--set", f"output_dir={tmp_path / 'two'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("2 processes") == 2 and two.stdout.count("row 1/2: lora") == 1
    for row in ("lora", "prompt-tuning"):
        one_run, two_run = _report(tmp_path / "out", row), _report(tmp_path / "two", row)
        assert two_run["eval"]["after"]["loss"] == pytest.approx(one_run["eval"]["after"]["loss"], abs=1e-5)
        assert two_run["probe"]["answer"] == one_run["probe"]["answer"]
    assert [r["status"] for r in json.loads((tmp_path / "two" / "compare.json").read_text())["rows"]] == [
        "done",
        "done",
    ]
