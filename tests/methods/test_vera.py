"""VeRA against the math and against HF PEFT (the reference) on tiny models: the shared projections drawn
as HF PEFT draws them, saved or drawn again from the key."""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
from layer_methods import (
    NOISE,
    Case,
    CommonChecks,
    injected,
    max_diff,
    pytest_generate_tests,  # noqa: F401  (it parametrizes CommonChecks here)
)
from peft.tuners.vera.model import _kaiming_init
from safetensors.torch import load_file
from tiny import logits, randomise, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftcli.errors import UserError
from peftcli.methods import Context, make_config, modules, vera
from peftcli.runs import adapter as checkpoint

CASE = Case(
    "vera",
    {"rank": 8},
    peft.VeraConfig,
    {"r": 8},
    parts=("vera_lambda_b", "vera_lambda_d"),
    hf_random_init={"init_weights": False},
)
UNSAVED = Case(
    "vera",
    {"rank": 4, "save_projection": False, "projection_prng_key": 7},
    peft.VeraConfig,
    {"r": 4, "save_projection": False, "projection_prng_key": 7},
    parts=CASE.parts,
)


class TestAgainstHfPeft(CommonChecks):
    cases = {"saved": CASE, "unsaved": UNSAVED}


# --------------------------------------------------------------------------------------------------
# The shared projections


@pytest.mark.parametrize(
    ("rank", "in_max", "out_max", "seed"), [(8, 64, 96, 0), (3, 7, 5, 123), (256, 32, 32, 2**40)]
)
def test_projections_are_hf_peft_draws(rank, in_max, out_max, seed):
    generator = torch.Generator().manual_seed(seed)
    hf_a = _kaiming_init((rank, in_max), generator=generator)
    hf_b = _kaiming_init((out_max, rank), generator=generator)
    proj_a, proj_b = vera.draw_projections(rank, in_max, out_max, seed)
    assert torch.equal(proj_a, hf_a) and torch.equal(proj_b, hf_b)


def test_one_projection_pair_serves_every_layer_once_and_stays_shared():
    model, _ = injected(CASE, "llama", target_modules="all-linear")
    layers = [layer for _, layer in vera.vera_layers(model)]
    # the largest layer sizes: in 96 (down_proj), out 96 (gate/up)
    assert layers[0].shared.vera_A.shape == (8, 96) and layers[0].shared.vera_B.shape == (96, 8)
    assert all(layer.shared is layers[0].shared for layer in layers)
    assert "vera_A" not in "".join(model.state_dict())  # not the model's own state: the adapter's
    model.to(torch.float64)
    assert all(layer.shared.vera_A.dtype == torch.float64 for layer in layers)
    assert len({layer.shared.vera_A.data_ptr() for layer in layers}) == 1
    assert modules.count_parameters(model)[0] == sum(layer.out_features + 8 for layer in layers)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_fold_use_the_top_left_slices(kind):
    torch.manual_seed(0)
    base = nn.Linear(5, 3) if kind == "linear" else Conv1D(3, 5)
    proj_a, proj_b = vera.draw_projections(4, 9, 7, seed=1)  # larger than this layer: it reads a slice
    shared = modules.SharedTensors({"vera_A": proj_a, "vera_B": proj_b}, saved=True)
    layer = vera.wrap_layer(base, shared, rank=4)
    nn.init.normal_(layer.vera_lambda_b), nn.init.normal_(layer.vera_lambda_d)
    b, d = layer.vera_lambda_b, layer.vera_lambda_d
    delta = torch.diag(b) @ proj_b[:3] @ torch.diag(d) @ proj_a[:, :5]  # (out, in)
    weight = base.weight.T if kind == "conv1d" else base.weight
    x = torch.randn(2, 5)
    expected = x @ (weight + delta).T + base.bias
    torch.testing.assert_close(layer(x), expected)
    folded = vera.fold(layer, base.weight)
    torch.testing.assert_close(folded, (weight + delta).T if kind == "conv1d" else weight + delta)


def test_saved_projections_load_and_unsaved_ones_come_from_the_key(tmp_path):
    model, task = injected(UNSAVED, "llama")
    randomise(model, NOISE)
    checkpoint.save_adapter(model, UNSAVED.config(), task, "tiny", tmp_path)
    assert not [k for k in load_file(tmp_path / checkpoint.WEIGHTS_NAME) if "vera_A" in k or "vera_B" in k]
    assert json.loads((tmp_path / checkpoint.CONFIG_NAME).read_text())["projection_prng_key"] == 7
    # another key draws other projections: the key is what makes the adapter reload
    other, _ = injected(UNSAVED, "llama", projection_prng_key=8)
    other.load_state_dict(model.state_dict(), strict=False)
    vera.load_adapter_state(other, vera.adapter_state(model))
    assert max_diff(logits(other), logits(model)) > 1e-4

    saved, _ = injected(CASE, "llama")
    state = vera.adapter_state(saved)
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(state)
    wrong = {**state, "base_model.vera_A": torch.zeros_like(state["base_model.vera_A"])}
    vera.load_adapter_state(saved, wrong)
    assert not saved.model.layers[0].self_attn.q_proj.shared.vera_A.any()  # the file's projections won


def test_projections_in_a_file_that_does_not_save_them_are_ignored(tmp_path):
    model, _ = injected(UNSAVED, "llama")
    state = {
        **vera.adapter_state(model),
        "base_model.vera_A": torch.zeros(4, 64),
        "base_model.vera_B": torch.zeros(64, 4),
    }
    vera.load_adapter_state(model, state)  # as HF PEFT: the key's projections stay
    assert model.model.layers[0].self_attn.q_proj.shared.vera_A.any()


def test_a_file_without_the_projections_it_says_it_saves_is_refused():
    model, _ = injected(CASE, "llama")
    state = {k: v for k, v in vera.adapter_state(model).items() if k != "base_model.vera_B"}
    with pytest.raises(UserError, match="save_projection is true but the adapter file holds no projections"):
        vera.load_adapter_state(model, state)


def test_projections_are_drawn_on_a_meta_base():
    with torch.device("meta"):
        model = tiny_model("llama")
    model = vera.inject(model, make_config("vera", rank=4), Context("causal-lm"))
    _, layer = vera.vera_layers(model)[0]
    assert layer.vera_lambda_b.is_meta and not layer.shared.vera_A.is_meta
    expected, _ = vera.draw_projections(4, 64, 64, seed=0)
    assert torch.equal(layer.shared.vera_A, expected)


# --------------------------------------------------------------------------------------------------
# Bad input


def test_config_from_adapter_refuses_what_changes_the_math():
    fields = {"peft_type": "VERA", "r": 4, "target_modules": ["q_proj"]}
    for field, value in [("bias", "all"), ("layers_to_transform", [0]), ("layers_pattern", "layers")]:
        with pytest.raises(UserError, match=field):
            vera.config_from_adapter({**fields, field: value})
    with pytest.raises(UserError, match="r: expected an integer >= 1"):
        vera.config_from_adapter({**fields, "r": 0})
    config = vera.config_from_adapter({**fields, "init_weights": False, "fan_in_fan_out": True})
    assert config == make_config("vera", rank=4, target_modules=["q_proj"])


def test_recipe_ranges():
    from peftcli.recipe import RecipeError, load_recipe

    for method, message in [
        ({"rank": 0}, "method.rank: must be > 0"),
        ({"dropout": 1.0}, "method.dropout: must be in [0, 1)"),
        ({"projection_prng_key": 2**64}, "method.projection_prng_key: must be in"),
    ]:
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe(
                None, data={"model": {"name": "x"}, "method": {"name": "vera", **method}}, paths=False
            )
