"""peftcli/train/reference.py: the reference policy's log-probs, computed once with the adapter switched off
(or from the adapter training continues), cached beside the tokenized data and read back, keyed on what
they depend on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from tiny import randomise, save_tiny

from peftcli.data import cache
from peftcli.methods import METHODS, Context, make_config
from peftcli.models.load import load_model
from peftcli.models.sources import resolve
from peftcli.recipe import load_recipe
from peftcli.runs import adapter as adapter_files
from peftcli.train import loop, reference
from peftcli.train.loss import model_token_logprobs

PAIRS = [
    {"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"Maybe {i}."}
    for i in range(8)
]


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTCLI_CACHE", str(tmp_path / "cache"))
    return str(save_tiny(tmp_path / "llama", "llama"))


def recipe_for(tmp_path: Path, base: str, method: dict, name: str = "run", **method_extra):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    recipe = {
        "model": {"name": base},
        "method": {**method, **method_extra},
        "data": {"train": str(data), "format": "preference", "validation": 0.25, "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 2, "objective": "dpo"},
        "output_dir": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path)


def logps_of(model, split, pad_id) -> torch.Tensor:
    return reference.row_logprobs(model.eval(), split, model_token_logprobs, 4, pad_id, torch.device("cpu"))


def test_a_fresh_adapter_refers_to_the_base_model_and_the_cache_serves_the_next_run(
    tmp_path, base, monkeypatch
):
    """Prompt tuning's fresh virtual tokens change the outputs: the reference is the base without them."""
    s = loop.setup(recipe_for(tmp_path, base, {"name": "prompt-tuning", "num_virtual_tokens": 4}))
    assert s.accelerator.unwrap_model(s.model).training  # handed back in train mode
    plain = load_model(resolve(base), "causal-lm")
    for split in (s.train_examples, s.eval_examples):
        assert split.reference_logps.shape == (split.num_rows,)
        torch.testing.assert_close(
            split.reference_logps, logps_of(plain, split, s.pad_id), rtol=1e-5, atol=1e-5
        )
        with_tokens = logps_of(s.accelerator.unwrap_model(s.model), split, s.pad_id)
        assert not torch.allclose(split.reference_logps, with_tokens, atol=1e-3)
    calls = []
    monkeypatch.setattr(reference, "row_logprobs", lambda *a, **k: calls.append(a))
    again = loop.setup(
        recipe_for(tmp_path, base, {"name": "prompt-tuning", "num_virtual_tokens": 4}, "again")
    )
    assert calls == []  # from the cache
    assert torch.equal(again.train_examples.reference_logps, s.train_examples.reference_logps)


def test_training_from_an_adapter_refers_to_that_adapter(tmp_path, base):
    model = METHODS["lora"].inject(
        load_model(resolve(base), "causal-lm"), make_config("lora", rank=4), Context("causal-lm")
    )
    randomise(model, 0.5)
    saved = tmp_path / "sft"
    adapter_files.save_adapter(model, make_config("lora", rank=4), "causal-lm", base, saved)
    s = loop.setup(recipe_for(tmp_path, base, {"name": "lora", "from_adapter": str(saved)}))
    split = s.train_examples
    torch.testing.assert_close(split.reference_logps, logps_of(model, split, s.pad_id), rtol=1e-5, atol=1e-5)
    plain = load_model(resolve(base), "causal-lm")
    assert not torch.allclose(split.reference_logps, logps_of(plain, split, s.pad_id), atol=1e-3)


def test_the_key_follows_the_base_files_and_the_adapter_started_from(tmp_path, base):
    recipe = recipe_for(tmp_path, base, {"name": "lora"})
    key = reference.model_key(recipe, "no")
    assert reference.model_key(recipe, "bf16") != key
    weights = next(Path(base).glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert reference.model_key(recipe, "no") != key
    saved = tmp_path / "adapter"
    model = METHODS["lora"].inject(
        load_model(resolve(base), "causal-lm"), make_config("lora"), Context("causal-lm")
    )
    adapter_files.save_adapter(model, make_config("lora"), "causal-lm", base, saved)
    first = reference.model_key(
        recipe_for(tmp_path, base, {"name": "lora", "from_adapter": str(saved)}), "no"
    )
    randomise(model)
    adapter_files.save_adapter(model, make_config("lora"), "causal-lm", base, saved)
    assert (
        reference.model_key(recipe_for(tmp_path, base, {"name": "lora", "from_adapter": str(saved)}), "no")
        != first
    )


@pytest.mark.parametrize("damage", ["truncate", "wrong rows"])
def test_a_damaged_reference_file_is_made_again(tmp_path, base, damage):
    s = loop.setup(recipe_for(tmp_path, base, {"name": "lora"}))
    (path,) = (tmp_path / "cache" / "data").glob("*.reference-*.safetensors")
    expected = s.train_examples.reference_logps.clone()
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    else:
        cache.save_reference(path, {"train": torch.zeros(3), "validation": torch.zeros(2)})
    again = loop.setup(recipe_for(tmp_path, base, {"name": "lora"}, "again"))
    torch.testing.assert_close(again.train_examples.reference_logps, expected)
