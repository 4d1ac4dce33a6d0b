"""Bottleneck adapters (peftcli/methods/adapter.py): placement, math, training, save/load, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import (
    ARCHS,
    batch,
    logits,
    one_step_changes,
    randomise,
    task_of,
    tiny_config,
    tiny_model,
    trainable_names,
)
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from peftcli.errors import UserError
from peftcli.methods import Context, MethodConfig, adapter, make_config
from peftcli.methods.modules import AdaptedLayer, AdapterError, count_parameters
from peftcli.runs.adapter import load_adapter, save_adapter

NUM_LABELS = 3
# (hidden size, layers, head parameters) of each tiny model, from tests/tiny.py.
HIDDEN = {"llama": 64, "gpt2": 32, "opt": 32, "bert": 32, "roberta": 32}
LAYERS = 2
HEAD = {
    "bert": 32 * NUM_LABELS + NUM_LABELS,  # classifier: Linear(32, 3)
    "roberta": (32 * 32 + 32) + (32 * NUM_LABELS + NUM_LABELS),  # classifier.dense + classifier.out_proj
}


def method(**fields) -> MethodConfig:
    return make_config("adapter", **fields)


def closed_form(hidden: int, bottleneck: int, sites: int) -> int:
    # down: hidden*b + b, up: b*hidden + hidden, per site
    return sites * (2 * hidden * bottleneck + bottleneck + hidden)


def is_adapter(module) -> bool:
    return isinstance(module, AdaptedLayer) and module.method == "adapter"


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_output_equals_base_at_init(arch, placement):
    base = tiny_model(arch)
    model = adapter.inject(copy.deepcopy(base), method(placement=placement), Context(task_of(arch)))
    assert any(is_adapter(m) for m in model.modules())
    inputs = batch()
    assert torch.equal(logits(model, inputs), logits(base, inputs))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_counts_match_closed_form(arch, placement):
    base = tiny_model(arch)
    _, base_total = count_parameters(base)
    model = adapter.inject(base, method(placement=placement), Context(task_of(arch)))
    hidden = HIDDEN[arch]
    sites = LAYERS * (2 if placement == "houlsby" else 1)
    expected = closed_form(hidden, hidden // 16, sites) + HEAD.get(arch, 0)
    trainable, total = count_parameters(model)
    assert trainable == expected
    # The adapter adds new parameters; the head's trained copy sits next to its frozen original.
    assert total == base_total + expected


def test_houlsby_doubles_pfeiffer():
    counts = {}
    for placement in ("houlsby", "pfeiffer"):
        model = adapter.inject(tiny_model("llama"), method(placement=placement), Context("causal-lm"))
        counts[placement] = count_parameters(model)[0]
    # llama: hidden 64, bottleneck 64 // 16 = 4, 2 layers -> 2 * (2*64*4 + 4 + 64) = 1160 for pfeiffer
    assert counts == {"pfeiffer": 1160, "houlsby": 2320}


@pytest.mark.parametrize(
    "arch,attention,feed_forward",
    [
        ("llama", "model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"),
        ("gpt2", "transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"),
        ("opt", "model.decoder.layers.{i}.self_attn.out_proj", "model.decoder.layers.{i}.fc2"),
        ("bert", "bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.output.dense"),
        (
            "roberta",
            "roberta.encoder.layer.{i}.attention.output.dense",
            "roberta.encoder.layer.{i}.output.dense",
        ),
    ],
)
def test_placement_sites(arch, attention, feed_forward):
    def wrapped(placement):
        model = adapter.inject(tiny_model(arch), method(placement=placement), Context(task_of(arch)))
        return [n for n, m in model.named_modules() if is_adapter(m)]

    layers = range(LAYERS)
    assert wrapped("pfeiffer") == [feed_forward.format(i=i) for i in layers]
    assert wrapped("houlsby") == [s.format(i=i) for i in layers for s in (attention, feed_forward)]


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_forward_is_residual_bottleneck(activation):
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    module = adapter.wrap_layer(base, bottleneck=3, activation=activation)
    assert module.adapter_down.weight.shape == (3, 6) and module.adapter_up.weight.shape == (6, 3)
    assert (
        torch.count_nonzero(module.adapter_up.weight) == 0
        and torch.count_nonzero(module.adapter_up.bias) == 0
    )
    nn.init.normal_(module.adapter_up.weight)
    nn.init.normal_(module.adapter_up.bias)
    x = torch.randn(2, 5, 8)
    act = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}
    h = x @ base.weight.T + base.bias
    down, up = module.adapter_down, module.adapter_up
    expected = h + act[activation](h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(module(x), expected)


def test_bottleneck_size_and_reduction_factor():
    model = adapter.inject(tiny_model("llama"), method(bottleneck_size=5), Context("causal-lm"))
    sizes = {m.bottleneck for m in model.modules() if is_adapter(m)}
    assert sizes == {5}
    model = adapter.inject(tiny_model("llama"), method(reduction_factor=1000), Context("causal-lm"))
    sizes = {m.bottleneck for m in model.modules() if is_adapter(m)}
    assert sizes == {1}  # 64 // 1000 = 0, floored at 1


@pytest.mark.parametrize("arch", ARCHS)
def test_only_adapter_and_head_train_and_one_step_changes_only_them(arch):
    model = adapter.inject(tiny_model(arch), method(placement="houlsby"), Context(task_of(arch)))
    trainable = trainable_names(model)
    assert trainable
    for name in trainable:
        assert ".adapter_down." in name or ".adapter_up." in name or ".trained." in name, name
    changed = one_step_changes(model, task_of(arch), weight_decay=0.0)
    # With `up` at zero, no gradient reaches `down` on the first step: d out / d down = up^T (...) = 0.
    for m in model.modules():
        if is_adapter(m):
            assert torch.count_nonzero(m.adapter_down.weight.grad) == 0
            assert torch.count_nonzero(m.adapter_up.weight.grad) > 0
    assert changed <= trainable
    assert any(".adapter_up." in n for n in changed)
    if task_of(arch) == "sequence-classification":
        assert any(".trained." in n for n in changed)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    task = task_of(arch)
    section = method(placement="houlsby", activation="gelu")
    model = adapter.inject(tiny_model(arch), section, Context(task))
    randomise(model, replace=True)  # non-trivial adapters (and head): outputs differ from the base model's
    inputs = batch()
    trained = logits(model, inputs)
    assert not torch.allclose(trained, logits(tiny_model(arch), inputs))  # the adapters do something
    save_adapter(model, section, task, "tiny", tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK_ADAPTER"
    assert config["placement"] == "houlsby" and config["activation"] == "gelu"
    assert len(config["target_modules"]) == 2 * LAYERS

    loaded, loaded_method = load_adapter(tiny_model(arch), tmp_path)
    assert loaded_method.placement == "houlsby" and loaded_method.activation == "gelu"
    assert torch.equal(logits(loaded, inputs), trained)
    assert adapter_keys(loaded) == adapter_keys(model)


def adapter_keys(model):
    return sorted(adapter.adapter_state(model))


def test_state_keys():
    model = adapter.inject(tiny_model("llama"), method(), Context("causal-lm"))
    keys = adapter_keys(model)
    assert "base_model.model.model.layers.0.mlp.down_proj.adapter_down.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.adapter_up.bias" in keys
    assert len(keys) == LAYERS * 4
    model = adapter.inject(tiny_model("bert"), method(), Context("sequence-classification"))
    keys = adapter_keys(model)
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    assert "base_model.model.bert.encoder.layer.1.output.dense.adapter_up.weight" in keys


def test_load_rejects_missing_unexpected_and_misshapen():
    model = adapter.inject(tiny_model("gpt2"), method(), Context("causal-lm"))
    state = adapter.adapter_state(model)
    key = next(iter(state))
    with pytest.raises(AdapterError, match="missing"):
        adapter.load_adapter_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(AdapterError, match="unexpected"):
        adapter.load_adapter_state(model, {**state, "base_model.model.extra.weight": torch.zeros(1)})
    other = adapter.adapter_state(
        adapter.inject(tiny_model("gpt2"), method(bottleneck_size=3), Context("causal-lm"))
    )
    with pytest.raises(AdapterError, match="shape"):
        adapter.load_adapter_state(model, other)


def test_meta_device_inject_counts():
    config = tiny_config("llama")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    model = adapter.inject(meta, method(placement="houlsby"), Context("causal-lm"))
    for m in model.modules():
        if is_adapter(m):
            assert m.adapter_down.weight.is_meta and m.adapter_up.bias.is_meta
    assert count_parameters(model) == count_parameters(
        adapter.inject(tiny_model("llama"), method(placement="houlsby"), Context("causal-lm"))
    )
    with torch.device("meta"):
        meta = AutoModelForSequenceClassification.from_config(tiny_config("bert"))
    model = adapter.inject(meta, method(), Context("sequence-classification"))
    assert count_parameters(model)[0] == closed_form(32, 2, LAYERS) + HEAD["bert"]


def test_dtype_follows_base():
    model = adapter.inject(tiny_model("opt").to(torch.bfloat16), method(), Context("causal-lm"))
    dtypes = {p.dtype for n, p in model.named_parameters() if "adapter_" in n}
    assert dtypes == {torch.bfloat16}


def test_unknown_architecture_is_a_user_error():
    model = tiny_model("llama")
    model.config.model_type = "lama"
    with pytest.raises(UserError, match=r"model type `lama`.*did you mean `llama`.*target_modules"):
        adapter.inject(model, method(), Context("causal-lm"))


def test_explicit_target_modules():
    model = adapter.inject(tiny_model("opt"), method(target_modules=["fc1"]), Context("causal-lm"))
    wrapped = {n: m.bottleneck for n, m in model.named_modules() if is_adapter(m)}
    # fc1's output is the feed-forward width (64), so the bottleneck is 64 // 16 = 4.
    assert wrapped == {f"model.decoder.layers.{i}.fc1": 4 for i in range(LAYERS)}
    with pytest.raises(UserError, match="fc3"):
        adapter.inject(tiny_model("opt"), method(target_modules=["fc3"]), Context("causal-lm"))


def test_head_never_gets_an_adapter():
    # roberta's head has its own `dense`; training it in full excludes it from adapter targets.
    model = adapter.inject(
        tiny_model("roberta"), method(target_modules=["dense"]), Context("sequence-classification")
    )
    names = [n for n, m in model.named_modules() if is_adapter(m)]
    assert names and not any(n.startswith("classifier") for n in names)


def test_llama_sequence_classification_trains_score_head():
    model = adapter.inject(
        tiny_model("llama", "sequence-classification"), method(), Context("sequence-classification")
    )
    keys = adapter_keys(model)
    assert "base_model.model.score.weight" in keys


def test_config_round_trip_and_validation():
    section = method(placement="houlsby", bottleneck_size=7, reduction_factor=4, activation="tanh")
    model = adapter.inject(tiny_model("gpt2"), section, Context("causal-lm"))
    config = adapter.adapter_config(model, section, "causal-lm")
    assert config["modules_to_save"] == []
    rebuilt = adapter.config_from_adapter({**config, "some_future_field": 1})
    assert (rebuilt.name, rebuilt.placement, rebuilt.bottleneck_size) == ("adapter", "houlsby", 7)
    assert (rebuilt.reduction_factor, rebuilt.activation) == (4, "tanh")
    assert rebuilt.target_modules == config["target_modules"]
    with pytest.raises(UserError, match="placement.*'parallel'"):
        adapter.config_from_adapter({**config, "placement": "parallel"})
    with pytest.raises(UserError, match="activation"):
        adapter.config_from_adapter({**config, "activation": "swish"})
    with pytest.raises(UserError, match="bottleneck_size"):
        adapter.config_from_adapter({**config, "bottleneck_size": 0})
    with pytest.raises(UserError, match="reduction_factor"):
        adapter.config_from_adapter({**config, "reduction_factor": "16"})


def test_bad_method_fields_are_user_errors():
    with pytest.raises(UserError, match="method.activation.*'swish'"):
        adapter.inject(tiny_model("gpt2"), method(activation="swish"), Context("causal-lm"))
    with pytest.raises(UserError, match="method.placement.*'parallel'"):
        adapter.inject(tiny_model("gpt2"), method(placement="parallel"), Context("causal-lm"))


def test_not_mergeable():
    assert adapter.MERGEABLE is False and "non-linear" in adapter.WHY_NOT_MERGEABLE
    with pytest.raises(UserError, match="cannot be merged"):
        adapter.merge(tiny_model("gpt2"))
