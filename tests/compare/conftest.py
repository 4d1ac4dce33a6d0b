"""Shared by the `peft compare` tests: tiny saved models, and a recipe on a small chat or class set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]
    }
    for i in range(16)
]
CLASSES = [
    {"text": f"{'good' if i % 2 else 'bad'} trip {i}", "label": "pos" if i % 2 else "neg"} for i in range(16)
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTCLI_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(base, classify=False, method=None, **train) -> the path of a recipe of 2 steps on 16 rows
    (4 held out) with an eval each step; `train` overrides its train keys."""

    def write(base: str, classify: bool = False, method: dict | None = None, **train) -> Path:
        rows = CLASSES if classify else CHAT
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        recipe = {
            "model": {"name": base, "task": "sequence-classification" if classify else "causal-lm"},
            "method": method or {"name": "lora", "rank": 2},
            "data": {
                "train": str(data),
                "format": "classification" if classify else "chat",
                "validation": 0.25,
            },
            "train": {"max_steps": 2, "batch_size": 4, "eval_every": 1, "seed": 0, **train},
            "output_dir": str(tmp_path / "out"),
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write
