"""The registry (peftcli/methods/__init__.py): a method is one module plus one registry entry.

A toy method, written to a temporary module here, is registered and nothing else changes: `peft count`
(from shapes and on the meta model), `peft train` and loading its adapter back all work with it.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny, tiny_config
from typer.testing import CliRunner

from peftcli import methods
from peftcli.cli import app
from peftcli.count import meta_counts
from peftcli.runs.adapter import AdapterDir

# y = base(x) * (1 + gain): one trainable gain per output feature of each target layer. The module uses
# only the methods package's public helpers, as any method module would.
TOY = '''
"""Toy: y = base(x) * (1 + gain), one gain per output feature, on the target layers."""

from dataclasses import dataclass
from typing import ClassVar

from peftcli.lazy import LazyModule, nn
from peftcli.methods import layout
from peftcli.methods.base import MethodConfig, check_positive, saved_modules

modules = LazyModule("peftcli.methods.modules")

NAME = "toy"
PEFT_TYPE = "TOY"
MERGEABLE = False
WHY_NOT_MERGEABLE = "it is a toy"


@dataclass
class Config(MethodConfig):
    name: ClassVar[str] = NAME
    target_modules: list[str] | None = None
    init_gain: float = 0.0

    def check(self, fail):
        if self.init_gain < 0:
            fail("init_gain", f"must be >= 0, got {self.init_gain}")


def run(layer, x):
    return layer.base(x) * (1 + layer.gain)


def _targets(names, config):
    targets = config.target_modules or ["q_proj", "v_proj"]
    return [n for n in names if any(layout.matches(n, t) for t in targets)]


def inject(model, config, context):
    modules.freeze(model)
    linears = [n for n, m in model.named_modules() if modules.is_linear(m)]
    for name in _targets(linears, config):
        layer = modules.AdaptedLayer(model.get_submodule(name), NAME, run, "ToyLayer")
        layer.gain = nn.Parameter(layer.base.weight.new_full((layer.out_features,), config.init_gain))
        modules.set_submodule(model, name, layer)
    modules.wrap_modules_to_save(model, *saved_modules(config, context.task))
    return model


def adapter_state(model):
    return modules.layer_state(model, NAME)


def load_adapter_state(model, state):
    modules.load_layer_state(model, NAME, state)


def merge(model):
    raise RuntimeError(WHY_NOT_MERGEABLE)


def count(shapes, config, saved):
    added = sum(shapes.linears[n].out_features for n in _targets(list(shapes.linears), config))
    return added, added


def adapter_config(model, config, task):
    return {"target_modules": config.target_modules, "init_gain": config.init_gain}


def config_from_adapter(fields):
    return Config(target_modules=fields.get("target_modules"), init_gain=fields.get("init_gain", 0.0))
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy method's module, registered: the one change a new method needs beside its own file."""
    path = tmp_path / "toy_method.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_method", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_method", module)
    spec.loader.exec_module(module)
    monkeypatch.setitem(methods.METHODS, "toy", module)
    monkeypatch.setenv("PEFTCLI_CACHE", str(tmp_path / "cache"))
    return module


def test_a_registered_method_is_counted_from_shapes_and_on_the_meta_model(toy, tmp_path):
    tiny_config("llama").save_pretrained(tmp_path / "config")
    result = CliRunner().invoke(app, ["count", str(tmp_path / "config"), "-m", "toy", "-m", "lora", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    config = methods.make_config("toy")
    (meta,) = meta_counts(str(tmp_path / "config"), [config])
    counted = {k: v for k, v in rows[0].items() if k not in ("memory", "precision")}  # (tests/test_memory.py)
    assert counted == {**meta.to_dict(), "method": "toy"} and rows[0]["trainable"] == 2 * (64 + 32)
    assert rows[0]["memory"]["trained_bytes"] == 16 * rows[0]["trainable"]
    assert rows[1]["method"] == "lora"


def test_a_registered_method_trains_saves_and_loads(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_tiny(tmp_path / "base", "llama")
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"number {i} then {i + 1}"}) + "\n" for i in range(12))
    )
    (tmp_path / "recipe.yaml").write_text(
        "model: {name: ./base}\n"
        "method: {name: toy, target_modules: [v_proj], init_gain: 0.5}\n"
        "data: {train: train.jsonl, max_length: 32}\n"
        "train: {max_steps: 3, batch_size: 4, learning_rate: 0.05}\n"
        "output_dir: run\n"
    )
    result = CliRunner().invoke(app, ["train", "recipe.yaml"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TOY" and config["init_gain"] == 0.5
    gains = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert sorted(gains) == [f"base_model.model.model.layers.{i}.self_attn.v_proj.gain" for i in (0, 1)]
    assert not torch.allclose(gains[sorted(gains)[0]], torch.full((32,), 0.5))  # it trained

    adapter = AdapterDir(tmp_path / "run")
    assert adapter.method == methods.make_config("toy", target_modules=["v_proj"], init_gain=0.5)
    model = adapter.load_model()
    loaded = toy.adapter_state(model)
    assert all(torch.equal(loaded[key], gains[key]) for key in gains)
    wrong = CliRunner().invoke(app, ["train", "recipe.yaml", "--overwrite", "--set", "method.init_gain=-1"])
    assert wrong.exit_code == 2 and "method.init_gain: must be >= 0, got -1" in wrong.stderr
