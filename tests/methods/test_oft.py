"""OFT against the math and against HF PEFT 0.21 (the reference) on tiny models."""

from __future__ import annotations

import logging

import peft
import pytest
import torch
from layer_methods import (
    Case,
    CommonChecks,
    assert_hf_refuses_conv1d,
    injected,
    pytest_generate_tests,  # noqa: F401  (it parametrizes CommonChecks here)
)
from peft.tuners.oft.layer import OFTLayer, OFTRotationModule
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftcli.errors import UserError
from peftcli.methods import make_config, oft

CASE = Case(
    "oft",
    {"block_size": 8},
    peft.OFTConfig,
    {"oft_block_size": 8},
    parts=("oft_R.weight",),
    hf_archs=("llama", "bert"),
    hf_random_init={"init_weights": False},
)
# By block count, the exact Cayley transform, one shared block per layer.
EXACT_SHARED = Case(
    "oft",
    {"num_blocks": 4, "use_cayley_neumann": False, "block_share": True},
    peft.OFTConfig,
    {"r": 4, "oft_block_size": 0, "use_cayley_neumann": False, "block_share": True},
    parts=("oft_R.weight",),
    hf_archs=("llama", "bert"),
    hf_random_init={"init_weights": False},
)


class TestAgainstHfPeft(CommonChecks):
    cases = {"neumann": CASE, "exact-shared": EXACT_SHARED}


def test_gpt2_conv1d_is_adapted_here_and_refused_by_hf_peft(tmp_path):
    assert_hf_refuses_conv1d(CASE, tmp_path)


# --------------------------------------------------------------------------------------------------
# The math


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("neumann", [True, False])
def test_rotations_are_hf_peft_s(terms, neumann):
    torch.manual_seed(0)
    hf = OFTRotationModule(3, 10, 5, 15, use_cayley_neumann=neumann, num_cayley_neumann_terms=terms)
    nn.init.normal_(hf.weight, std=0.1)
    layer = oft.wrap_layer(
        nn.Linear(15, 4),
        make_config("oft", block_size=5, use_cayley_neumann=neumann, num_cayley_neumann_terms=terms),
    )
    layer.oft_R.weight.data.copy_(hf.weight.data)
    blocks = oft.rotations(layer)
    torch.testing.assert_close(torch.block_diag(*blocks), hf.get_weight(), rtol=0, atol=1e-6)
    if not neumann:  # the exact transform is orthogonal
        torch.testing.assert_close(
            blocks @ blocks.transpose(1, 2), torch.eye(5).expand(3, 5, 5), atol=1e-6, rtol=0
        )


def test_the_block_size_is_moved_as_hf_peft_moves_it(caplog):
    for in_features in range(1, 130):
        for value in (1, 2, 3, 5, 8, 16, 32, 100, 200):
            assert oft.nearest_divisor(in_features, value) == OFTLayer.adjust_oft_parameters(
                None, in_features, value
            )
    with caplog.at_level(logging.WARNING):
        model, _ = injected(
            CASE, "llama", block_size=12, target_modules=["down_proj"]
        )  # 96 inputs: 12 divides
        assert not caplog.records
        model, _ = injected(CASE, "llama", block_size=20, target_modules=["down_proj"])
    _, layer = oft.oft_layers(model)[0]
    # 20 -> the nearest divisors of 96 are 16 and 24, both 4 away: the lower one wins
    assert (layer.num_blocks, layer.block_size) == (6, 16)
    assert "block_size 20 does not divide a layer's 96 inputs: 16 used there" in caplog.text


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_fold_rotate_the_input(kind):
    torch.manual_seed(0)
    base = nn.Linear(6, 4) if kind == "linear" else Conv1D(4, 6)
    layer = oft.wrap_layer(base, make_config("oft", block_size=3, use_cayley_neumann=False))
    nn.init.normal_(layer.oft_R.weight, std=0.3)
    rotation = torch.block_diag(*oft.rotations(layer))  # (6, 6), orthogonal
    weight = base.weight.T if kind == "conv1d" else base.weight
    x = torch.randn(2, 6)
    torch.testing.assert_close(layer(x), (x @ rotation) @ weight.T + base.bias)
    folded = oft.fold(layer, base.weight)
    torch.testing.assert_close(folded, (weight @ rotation.T).T if kind == "conv1d" else weight @ rotation.T)


def test_recipe_and_adapter_config_fields():
    from peftcli.recipe import RecipeError, load_recipe

    data = {"model": {"name": "x"}, "method": {"name": "oft", "block_size": 8, "num_blocks": 4}}
    with pytest.raises(RecipeError, match="method.num_blocks: set block_size or num_blocks, not both"):
        load_recipe(None, data=data, paths=False)
    fields = {
        "peft_type": "OFT",
        "r": 0,
        "oft_block_size": 16,
        "target_modules": ["q_proj"],
        "peft_version": "0.21.2",
    }
    assert oft.config_from_adapter(fields) == make_config("oft", block_size=16, target_modules=["q_proj"])
    for bad, message in [
        ({"coft": True}, "coft"),
        ({"bias": "all"}, "bias"),
        ({"r": 4}, "exactly one of r"),
        ({"oft_block_size": 0}, "exactly one of r"),
    ]:
        with pytest.raises(UserError, match=message):
            oft.config_from_adapter({**fields, **bad})
    with pytest.raises(UserError, match="HF PEFT 0.15 or older"):
        oft.config_from_adapter({"peft_type": "OFT", "r": 8, "target_modules": ["q_proj"]})


def test_an_old_neumann_adapter_is_loaded_with_a_warning(caplog):
    fields = {"peft_type": "OFT", "r": 0, "oft_block_size": 16, "use_cayley_neumann": True}
    with caplog.at_level(logging.WARNING):
        oft.config_from_adapter({**fields, "peft_version": "0.17.1"})
    assert "before 0.18" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        oft.config_from_adapter({**fields, "peft_version": "0.21.2@abc"})
        oft.config_from_adapter({**fields, "use_cayley_neumann": False})
    assert not caplog.records


def test_our_adapter_names_the_format_it_follows(tmp_path):
    model, task = injected(CASE, "llama")
    config = oft.adapter_config(model, CASE.config(), task)
    assert config["peft_version"] == oft.HF_PEFT_FORMAT and config["r"] == 0 and config["oft_block_size"] == 8
