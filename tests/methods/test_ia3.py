"""(IA)^3 against the math and against HF PEFT (the reference) on tiny models."""

from __future__ import annotations

import peft
import pytest
import torch
from layer_methods import (
    Case,
    CommonChecks,
    injected,
    pytest_generate_tests,  # noqa: F401  (it parametrizes CommonChecks here)
)
from tiny import tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftcli.errors import UserError
from peftcli.methods import Context, ia3, make_config
from peftcli.recipe import RecipeError, load_recipe

CASE = Case("ia3", {}, peft.IA3Config, {}, parts=("ia3_l",), hf_random_init={"init_ia3_weights": False})


class TestAgainstHfPeft(CommonChecks):
    cases = {"default": CASE}


# --------------------------------------------------------------------------------------------------
# The math


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_forward_and_fold_follow_the_formula(kind, feedforward):
    torch.manual_seed(0)
    base = nn.Linear(6, 4) if kind == "linear" else Conv1D(4, 6)
    nn.init.normal_(base.bias)  # Conv1D's starts at zero, which any scale leaves as it is
    layer = ia3.wrap_layer(base, feedforward)
    assert layer.ia3_l.shape == ((1, 6) if feedforward else (4, 1))  # HF PEFT's shapes
    nn.init.normal_(layer.ia3_l)
    weight = base.weight.T if kind == "conv1d" else base.weight  # (out, in)
    scale = layer.ia3_l.flatten()
    x = torch.randn(3, 6)
    expected = (x * scale) @ weight.T + base.bias if feedforward else (x @ weight.T + base.bias) * scale
    torch.testing.assert_close(layer(x), expected)
    merged = nn.Linear(6, 4)
    folded = ia3.fold(layer, base.weight)
    merged.weight.data = folded.T if kind == "conv1d" else folded
    merged.bias.data = ia3.fold_bias(layer, base.bias)
    torch.testing.assert_close(merged(x), expected)
    assert torch.equal(merged.bias, base.bias) == feedforward  # only an output scale touches the bias


def test_default_targets_and_feedforward_layers_follow_the_architecture():
    model, _ = injected(CASE, "llama")
    kinds = {name.split(".", 2)[-1]: layer.is_feedforward for name, layer in ia3.ia3_layers(model)}
    assert kinds == {
        "0.self_attn.k_proj": False,
        "0.self_attn.v_proj": False,
        "0.mlp.down_proj": True,
        "1.self_attn.k_proj": False,
        "1.self_attn.v_proj": False,
        "1.mlp.down_proj": True,
    }
    # BERT: `output.dense` ends both the attention output and the feed-forward output (HF PEFT's rule)
    model, _ = injected(CASE, "bert")
    feedforward = [name for name, layer in ia3.ia3_layers(model) if layer.is_feedforward]
    assert feedforward == [
        f"bert.encoder.layer.{i}.{site}"
        for i in (0, 1)
        for site in ("attention.output.dense", "output.dense")
    ]


def test_saved_targets_make_hf_peft_wrap_the_same_layers(tmp_path):
    # A regex picks layer 1's v_proj and down_proj only: the saved lists must not reach layer 0.
    section = make_config("ia3", target_modules=r".*\.1\.(self_attn\.v_proj|mlp\.down_proj)")
    model = ia3.inject(tiny_model("llama"), section, Context("causal-lm"))
    config = ia3.adapter_config(model, section, "causal-lm")
    assert config["target_modules"] == ["model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    assert config["feedforward_modules"] == ["model.layers.1.mlp.down_proj"]
    assert_hf_loads_ours_section(model, section, tmp_path)


def assert_hf_loads_ours_section(model, section, tmp_path):
    from tiny import logits, randomise

    from peftcli.runs import adapter as checkpoint

    randomise(model, 0.1)
    checkpoint.save_adapter(model, section, "causal-lm", "tiny", tmp_path)
    hf = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert float((logits(hf) - logits(model)).abs().max()) <= 1e-5


def test_feedforward_by_regex_and_leaves():
    section = make_config("ia3", target_modules=["v_proj", "up_proj"], feedforward_modules=r".*up_proj")
    model = ia3.inject(tiny_model("llama"), section, Context("causal-lm"))
    kinds = {name: layer.is_feedforward for name, layer in ia3.ia3_layers(model)}
    assert kinds["model.layers.0.mlp.up_proj"] and not kinds["model.layers.0.self_attn.v_proj"]
    config = ia3.adapter_config(model, section, "causal-lm")
    assert config["target_modules"] == ["up_proj", "v_proj"] and config["feedforward_modules"] == ["up_proj"]


# --------------------------------------------------------------------------------------------------
# Bad input


def refusal(method: dict) -> str:
    """The message a recipe with this `method:` section is refused with."""
    with pytest.raises(RecipeError) as info:
        load_recipe(None, data={"model": {"name": "x"}, "method": method}, paths=False)
    return str(info.value)


def test_recipe_checks_name_the_key():
    targets = {"name": "ia3", "target_modules": ["k_proj", "v_proj"]}
    assert "method.feedforward_modules: `down_proj` is not in target_modules" in refusal(
        {**targets, "feedforward_modules": ["down_proj"]}
    )
    message = refusal({"name": "ia3", "feedforward_modules": "(down"})
    assert "method.feedforward_modules: not a valid regular expression" in message


def test_an_architecture_without_defaults_needs_both_lists():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(UserError, match="method.target_modules: no default IA3 targets"):
        ia3.inject(model, make_config("ia3"), Context("causal-lm"))
    with pytest.raises(UserError, match="method.feedforward_modules: no default IA3 feed-forward"):
        ia3.inject(model, make_config("ia3", target_modules=["v_proj"]), Context("causal-lm"))
    model = ia3.inject(
        model, make_config("ia3", target_modules=["v_proj"], feedforward_modules=[]), Context("causal-lm")
    )
    assert len(ia3.ia3_layers(model)) == 2


def test_config_from_adapter_refuses_exclude_modules_and_reads_hf_fields():
    fields = {
        "peft_type": "IA3",
        "target_modules": ["v_proj", "k_proj"],
        "feedforward_modules": ["down_proj"],
    }
    with pytest.raises(UserError, match="exclude_modules"):
        ia3.config_from_adapter({**fields, "exclude_modules": ["k_proj"]})
    config = ia3.config_from_adapter({**fields, "fan_in_fan_out": True, "init_ia3_weights": False})
    assert config == make_config(
        "ia3", target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"]
    )
