"""BitFit (peftcli/methods/bitfit.py): bias selection, training, save/load, merge, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import batch, logits, one_step_changes, randomise, task_of, tiny_config, tiny_model, trainable_names
from torch import nn
from transformers import AutoModelForSequenceClassification

from peftcli.errors import UserError
from peftcli.methods import Context, MethodConfig, bitfit, make_config
from peftcli.methods.modules import KEY_PREFIX, AdapterError, ModulesToSave, count_parameters
from peftcli.runs.adapter import load_adapter, save_adapter

BIASED = ["gpt2", "opt", "bert", "roberta"]  # llama has no biases at all
HEADS = {"bert": "classifier", "roberta": "classifier"}


def method(**fields) -> MethodConfig:
    return make_config("bitfit", **fields)


def base_biases(model: nn.Module, head: str | None) -> dict[str, int]:
    """{parameter name: numel} for every bias outside the head, read off the plain model."""
    return {
        n: p.numel()
        for n, p in model.named_parameters()
        if n.endswith(".bias") and not (head and n.startswith(head + "."))
    }


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", BIASED)
def test_all_biases_train_and_counts(arch):
    base = tiny_model(arch)
    head = HEADS.get(arch)
    expected_biases = base_biases(base, head)
    head_params = sum(p.numel() for p in base.get_submodule(head).parameters()) if head else 0
    _, base_total = count_parameters(base)
    model = bitfit.inject(base, method(), Context(task_of(arch)))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    biases = {n: k for n, k in trainable.items() if ".trained." not in n}
    assert biases == expected_biases
    # LayerNorm biases are among them (the paper trains every bias term).
    assert any("LayerNorm.bias" in n or "ln_1.bias" in n or "layer_norm.bias" in n for n in biases)
    trained, total = count_parameters(model)
    assert trained == sum(expected_biases.values()) + head_params
    # BitFit trains the model's own biases: the total grows only by the head's trained copy.
    assert total == base_total + head_params


@pytest.mark.parametrize("arch", BIASED)
def test_one_step_changes_only_biases_and_head(arch):
    model = bitfit.inject(tiny_model(arch), method(), Context(task_of(arch)))
    trainable = trainable_names(model)
    changed = one_step_changes(model, task_of(arch))
    assert changed <= trainable
    assert any(n.endswith(".bias") and ".trained." not in n for n in changed)
    assert all(n.endswith(".bias") or ".trained." in n for n in changed)


def test_init_output_equals_base():
    base = tiny_model("bert")
    model = bitfit.inject(copy.deepcopy(base), method(), Context("sequence-classification"))
    assert torch.equal(logits(model, batch()), logits(base, batch()))


def test_subset_by_name_and_suffix():
    model = bitfit.inject(
        tiny_model("bert"), method(biases=["query", "intermediate.dense"]), Context("sequence-classification")
    )
    selected = sorted(n for n, p in model.named_parameters() if p.requires_grad and ".trained." not in n)
    assert selected == sorted(
        f"bert.encoder.layer.{i}.{m}.bias"
        for i in range(2)
        for m in ("attention.self.query", "intermediate.dense")
    )
    # `output.dense` is a suffix of both the attention output and the feed-forward output.
    model = bitfit.inject(
        tiny_model("bert"), method(biases=["output.dense"]), Context("sequence-classification")
    )
    selected = {n for n, p in model.named_parameters() if p.requires_grad and ".trained." not in n}
    assert selected == {
        f"bert.encoder.layer.{i}.{m}.bias"
        for i in range(2)
        for m in ("attention.output.dense", "output.dense")
    }
    model = bitfit.inject(tiny_model("gpt2"), method(biases=["c_attn"]), Context("causal-lm"))
    assert count_parameters(model)[0] == 2 * 3 * 32  # c_attn's bias is (3 * n_embd,) in each of 2 layers


def test_subset_no_match_is_a_user_error():
    with pytest.raises(UserError, match=r"method.biases: `quary`.*did you mean `query`.*intermediate"):
        bitfit.inject(tiny_model("bert"), method(biases=["quary"]), Context("sequence-classification"))
    with pytest.raises(UserError, match="method.biases"):
        bitfit.inject(tiny_model("bert"), method(biases="query"), Context("sequence-classification"))
    with pytest.raises(UserError, match="method.biases"):
        bitfit.inject(tiny_model("bert"), method(biases=[]), Context("sequence-classification"))


@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification"])
def test_llama_has_no_biases(task):
    with pytest.raises(UserError, match=r"llama has no bias terms.*lora"):
        bitfit.inject(tiny_model("llama", task), method(), Context(task))


def test_head_bias_is_the_heads_not_bitfits():
    model = bitfit.inject(tiny_model("bert"), method(), Context("sequence-classification"))
    assert "classifier" not in " ".join(bitfit.bias_modules(model))
    state = bitfit.adapter_state(model)
    assert state["base_model.model.classifier.bias"] is not None
    # The head key holds the trained copy, and it is there once.
    assert torch.equal(state["base_model.model.classifier.bias"], model.classifier.trained.bias)
    assert sum(k.startswith(KEY_PREFIX + "classifier.") for k in state) == 2


@pytest.mark.parametrize("arch", BIASED)
def test_state_keys_are_base_parameter_names(arch):
    model = bitfit.inject(tiny_model(arch), method(), Context(task_of(arch)))
    base_names = set(dict(tiny_model(arch).named_parameters()))
    keys = set(bitfit.adapter_state(model))
    assert keys and all(k.startswith(KEY_PREFIX) for k in keys)
    assert {k.removeprefix(KEY_PREFIX) for k in keys} <= base_names


@pytest.mark.parametrize("arch", BIASED)
def test_save_load_round_trip(arch, tmp_path):
    task = task_of(arch)
    section = method(biases="all")
    model = bitfit.inject(tiny_model(arch), section, Context(task))
    randomise(model, scale=1.0)
    inputs = batch()
    trained = logits(model, inputs)
    assert not torch.allclose(trained, logits(tiny_model(arch), inputs))
    save_adapter(model, section, task, "tiny", tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT" and config["biases"] == "all"
    loaded, loaded_method = load_adapter(tiny_model(arch), tmp_path)
    assert loaded_method.name == "bitfit"
    assert torch.equal(logits(loaded, inputs), trained)


def test_subset_round_trip(tmp_path):
    section = method(biases=["query", "value"])
    model = bitfit.inject(tiny_model("roberta"), section, Context("sequence-classification"))
    randomise(model, scale=1.0)
    save_adapter(model, section, "sequence-classification", "tiny", tmp_path)
    loaded, _ = load_adapter(tiny_model("roberta"), tmp_path)
    assert torch.equal(logits(loaded, batch()), logits(model, batch()))
    assert count_parameters(loaded) == count_parameters(model)


@pytest.mark.parametrize("arch", BIASED)
def test_merge_equals_unmerged(arch, tmp_path):
    model = bitfit.inject(tiny_model(arch), method(), Context(task_of(arch)))
    randomise(model, scale=1.0)
    inputs = batch()
    unmerged = logits(model, inputs)
    save_adapter(model, method(), task_of(arch), "tiny", tmp_path)
    merged = bitfit.merge(model)
    assert not any(isinstance(m, ModulesToSave) for m in merged.modules())
    assert set(merged.state_dict()) == set(tiny_model(arch).state_dict())
    assert torch.equal(logits(merged, inputs), unmerged)
    # A later merge reads the safetensors file: its keys, stripped, load straight into a plain base.
    plain = tiny_model(arch)
    state = {
        k.removeprefix(KEY_PREFIX): v for k, v in load_file(tmp_path / "adapter_model.safetensors").items()
    }
    result = plain.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert torch.equal(logits(plain, inputs), unmerged)


def test_load_rejects_wrong_keys_and_shapes():
    model = bitfit.inject(tiny_model("opt"), method(), Context("causal-lm"))
    state = bitfit.adapter_state(model)
    key = next(iter(state))
    with pytest.raises(AdapterError, match="missing"):
        bitfit.load_adapter_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(AdapterError, match="unexpected"):
        bitfit.load_adapter_state(model, {**state, KEY_PREFIX + "lm_head.bias": torch.zeros(3)})
    with pytest.raises(AdapterError, match="shape"):
        bitfit.load_adapter_state(model, {**state, key: torch.zeros(state[key].numel() + 1)})
    with pytest.raises(AdapterError, match="inject"):
        bitfit.adapter_state(tiny_model("opt"))


def test_meta_device_inject_counts():
    with torch.device("meta"):
        meta = AutoModelForSequenceClassification.from_config(tiny_config("bert"))
    model = bitfit.inject(meta, method(), Context("sequence-classification"))
    assert count_parameters(model) == count_parameters(
        bitfit.inject(tiny_model("bert"), method(), Context("sequence-classification"))
    )
    assert all(p.is_meta for p in model.parameters())


def test_config_round_trip_and_validation():
    section = method(biases=["query"])
    model = bitfit.inject(tiny_model("bert"), section, Context("sequence-classification"))
    config = bitfit.adapter_config(model, section, "sequence-classification")
    assert config["biases"] == ["query"]
    assert config["target_modules"] == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert config["modules_to_save"] == ["classifier", "score"]
    rebuilt = bitfit.config_from_adapter({**config, "unknown_field": True})
    assert rebuilt.name == "bitfit" and rebuilt.biases == config["target_modules"]
    assert bitfit.config_from_adapter({"biases": "all"}).biases == "all"
    with pytest.raises(UserError, match="biases"):
        bitfit.config_from_adapter({"biases": 3})
    with pytest.raises(UserError, match="target_modules"):
        bitfit.config_from_adapter({"target_modules": "query"})
    with pytest.raises(UserError, match="modules_to_save"):
        bitfit.config_from_adapter({"modules_to_save": "classifier"})
