"""`peft train` on quantized bases, end to end on a tiny Llama: what the run reports about its precision,
that it learns, and that generate loads the base as it was trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny import chat_rows, save_tiny

from peftcli.count import count_target
from peftcli.infer import load_for_inference, run_generate
from peftcli.quant import convert
from peftcli.recipe import load_recipe
from peftcli.train.run import run

CHAT = chat_rows(24)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("llama"), "llama"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTCLI_CACHE", str(tmp_path / "cache"))


def quantized_run(tmp_path: Path, base: str, quantize: str, dtype: str = "auto", steps: int = 4) -> Path:
    """A LoRA run on `base` stored as `quantize`; returns its output dir."""
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    recipe = {
        "model": {"name": base, "quantize": quantize, "dtype": dtype},
        "method": {"name": "lora", "rank": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {
            "train": str(tmp_path / "data.jsonl"),
            "format": "chat",
            "validation": 0.25,
            "max_length": 64,
        },
        "train": {"max_steps": steps, "batch_size": 4, "learning_rate": 1e-2, "seed": 0, "eval_every": 2},
        "output_dir": str(tmp_path / f"run-{quantize}"),
    }
    path = tmp_path / f"{quantize}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run(load_recipe(path))
    return Path(recipe["output_dir"])


@pytest.mark.parametrize("quantize", ["int8", "int4", "nf4"])
def test_a_quantized_run_reports_its_precision_and_learns(tmp_path, llama, quantize):
    out = quantized_run(tmp_path, llama, quantize)
    report = json.loads((out / "report.json").read_text())
    precision = report["precision"]
    assert precision["quantize"] == quantize and precision["quantize_reason"] == "model.quantize"
    assert precision["dtype"] == "float32" and precision["dtype_reason"].startswith("auto: ")
    assert precision["quantized_layers"] == {quantize: 14} and precision["trainable_dtype"] == "float32"
    # `peft count`'s memory column, from config.json alone, is what the run holds: the rotary frequencies
    # (64 bytes) and NF4's 16 levels per layer (64 bytes each) are all it leaves out
    _, (counted,), _ = count_target(llama, ["lora"], {}, dtype="float32", quantize=quantize)
    assert counted.frozen_bytes <= precision["frozen_bytes"] <= counted.frozen_bytes + 64 + 14 * 64
    assert report["eval"]["after"]["loss"] < report["eval"]["before"]["loss"]
    markdown = (out / "report.md").read_text()
    assert f"**frozen weights**: {quantize}" in markdown and "**base dtype**: float32 (auto:" in markdown
    # generate loads the base as the run trained it: quantized
    model, _, _ = load_for_inference(out)
    assert convert.describe(model) == {quantize: 14}
    assert isinstance(run_generate(out, "What is 3 plus 3?", max_new_tokens=4), str)


def test_a_bf16_run_keeps_fp32_master_copies(tmp_path, llama):
    out = quantized_run(tmp_path, llama, "int4", dtype="bfloat16", steps=2)
    precision = json.loads((out / "report.json").read_text())["precision"]
    assert precision["dtype"] == "bfloat16" and precision["dtype_reason"] == "model.dtype"
    assert precision["trainable_dtype"] == "float32"
    model, _, _ = load_for_inference(out)
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.base.compute_dtype == torch.bfloat16
