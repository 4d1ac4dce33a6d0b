"""The README's quickstart and the classification example, shortened, on the real packaged models."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def peft(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peftcli.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=1200
    )


@pytest.mark.parametrize("recipe", ["configs/quickstart.yaml", "configs/classification.yaml"])
def test_example_recipe_runs_shortened(tmp_path, recipe, monkeypatch):
    monkeypatch.setenv("PEFTCLI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    result = peft(
        "train",
        recipe,
        "--set",
        "train.max_steps=3",
        "--set",
        "train.epochs=null",
        "--set",
        "train.eval_every=null",
        "--set",
        "train.save_every=2",
        "--set",
        "train.max_eval_batches=2",
        "--set",
        f"output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3
    assert report["eval"]["before"]["loss"] > 0 and report["eval"]["after"]["loss"] > 0
    assert (out / "report.md").is_file() and (out / "checkpoints" / "step-2").is_dir()
    if "quickstart" in recipe:
        assert report["params"]["total"] > 130_000_000  # the real SmolLM2-135M, not a tiny stand-in
        answer = peft(
            "generate",
            str(out),
            "--prompt",
            "Which currency should I bring to Velmora?",
            "--max-new-tokens",
            "8",
        )
        assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr[-2000:]
        # the shortened quickstart adapter as GGUF, checked by llama.cpp: merged at q8_0; merged by default
        # (the packaged model's q4_1 kept where unchanged, the adapted tensors q8_0); the adapter alone
        for flags in (["--quant", "q8_0"], [], ["--adapter-only", "--ollama", str(tmp_path / "ollama")]):
            out = tmp_path / f"export-{len(flags)}.gguf"
            exported = peft("export", str(out.parent / "run"), "--gguf", str(out), *flags)
            assert exported.returncode == 0, exported.stdout[-2000:] + exported.stderr[-2000:]
            assert "identical greedy continuations" in exported.stdout and out.is_file()
            assert "note: llama.cpp" not in exported.stdout  # no warnings while loading
        assert (tmp_path / "ollama" / "Modelfile").read_text().startswith("FROM ")
    else:
        label = peft("predict", str(out), "--text", "The ferry was three hours late and nobody told us why.")
        assert label.returncode == 0, label.stderr[-2000:]
        assert label.stdout.split(" ")[0] in ("booking", "complaint", "praise", "question")


def test_compare_example_runs_shortened(tmp_path, monkeypatch):
    """configs/compare.yaml, every method at 1 step: BitFit is listed as not applying (SmolLM2 has no biases),
    the rest train and answer the probe; the table holds one line per trained row."""
    monkeypatch.setenv("PEFTCLI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "compare"
    settings = [
        "train.max_steps=1",
        "train.eval_every=null",
        "train.save_every=null",
        "train.max_eval_batches=1",
    ]
    result = peft(
        "compare", "configs/compare.yaml", *(f"--set={s}" for s in settings), f"--set=output_dir={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "compare.json").read_text())
    trained = ["lora", "prefix-tuning", "prompt-tuning", "adapter", "ia3", "vera", "loha", "lokr", "oft"]
    assert [r["row"] for r in summary["rows"]] == trained
    assert [r["row"] for r in summary["not_applicable"]] == ["bitfit"]
    assert all(r["status"] == "done" and r["probe_answer"] for r in summary["rows"])
    assert summary["probe"]["prompt"] == "Tell me the capital city of Velmora."
    markdown = (out / "compare.md").read_text()
    # each trained row: a line in the table and one among the probe answers
    rows = [line for line in markdown.splitlines() if line.startswith(tuple(f"| {r} " for r in trained))]
    assert len(rows) == 2 * len(trained)
