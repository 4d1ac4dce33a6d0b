"""runs/adapter.py: the one reader of adapter dirs — the config, the run's recipe through the schema."""

from __future__ import annotations

import json

import pytest
import yaml

from peftcli.errors import UserError
from peftcli.methods import make_config
from peftcli.recipe import Recipe, dump_recipe
from peftcli.runs.adapter import AdapterDir

LORA_CONFIG = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q"],
}


def adapter_dir(tmp_path, recipe_text: str | None = None, config: dict = LORA_CONFIG):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    if recipe_text is not None:
        (tmp_path / "recipe.yaml").write_text(recipe_text)
    return AdapterDir(tmp_path)


def test_the_runs_recipe_is_read_through_the_schema(tmp_path):
    recipe = Recipe()
    recipe.model.name, recipe.data.train, recipe.data.format = "gone/model", "gone.jsonl", "chat"
    recipe.train.learning_rate = 2e-4  # a run's recipe.yaml holds the rate it trained with
    read = adapter_dir(tmp_path, dump_recipe(recipe)).recipe
    assert read == recipe  # typed and defaulted; the data file need not exist any more
    bare = tmp_path / "bare"
    bare.mkdir()
    assert adapter_dir(bare).recipe is None  # a bare adapter dir (HF PEFT's) has none


def test_a_recipe_written_before_methods_had_their_own_sections_still_reads(tmp_path):
    # The method section of earlier versions listed every method's keys, whatever the method.
    old = yaml.safe_load(dump_recipe(Recipe()))
    old["model"]["name"], old["data"]["train"] = "gone/model", "gone.jsonl"
    old["method"] = {
        "name": "lora",
        "rank": 4,
        "alpha": 8.0,
        "num_virtual_tokens": 20,
        "placement": "pfeiffer",
        "biases": "all",
        "prompt_init": "random",
        "modules_to_save": None,
    }
    read = adapter_dir(tmp_path, yaml.safe_dump(old)).recipe
    assert read.method == make_config("lora", rank=4, alpha=8.0)


def test_a_recipe_that_does_not_read_is_left_out(tmp_path):
    assert adapter_dir(tmp_path, "model: [unclosed\n").recipe is None
    assert adapter_dir(tmp_path, "method:\n  name: lora\n  rnak: 4\n").recipe is None


def test_config_faults_are_named(tmp_path):
    with pytest.raises(UserError, match="adapter directory not found"):
        AdapterDir(tmp_path / "nowhere")
    with pytest.raises(UserError, match="holds no adapter_config.json"):
        AdapterDir(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{nope")
    with pytest.raises(UserError, match="not valid JSON"):
        AdapterDir(tmp_path)
    with pytest.raises(UserError, match="peft_type 'NOPE' is not supported"):
        _ = adapter_dir(tmp_path, config={"peft_type": "NOPE"}).method
    with pytest.raises(UserError, match="names no base model .* pass --base MODEL"):
        _ = adapter_dir(tmp_path).base
    assert AdapterDir(tmp_path, base="other/model").base == "other/model"
