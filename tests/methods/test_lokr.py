"""LoKr against the math and against HF PEFT (the reference) on tiny models."""

from __future__ import annotations

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
from peft.tuners.lokr.layer import factorization as hf_factorization
from tiny import logits, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftcli.errors import UserError
from peftcli.methods import lokr, make_config

# Rank 4 on tiny llama: q_proj (64 -> 64) splits as 8 x 8 both ways, whole W1 and W2 (4 >= 8 / 2).
CASE = Case(
    "lokr",
    {"rank": 4, "alpha": 6.0},
    peft.LoKrConfig,
    {"r": 4, "alpha": 6},
    parts=("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    hf_archs=("llama", "bert"),
    hf_random_init={"init_weights": False},
)
# Rank 1 with decompose_both and a factor of 4: every factor is a rank-1 product.
DECOMPOSED = Case(
    "lokr",
    {"rank": 1, "alpha": 2.0, "decompose_both": True, "decompose_factor": 4},
    peft.LoKrConfig,
    {"r": 1, "alpha": 2, "decompose_both": True, "decompose_factor": 4},
    parts=("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"),
    hf_archs=("llama", "bert"),
    hf_random_init={"init_weights": False},
)


class TestAgainstHfPeft(CommonChecks):
    cases = {"whole": CASE, "decomposed": DECOMPOSED}


def test_gpt2_conv1d_is_adapted_here_and_refused_by_hf_peft(tmp_path):
    assert_hf_refuses_conv1d(CASE, tmp_path)


# --------------------------------------------------------------------------------------------------
# The math


def test_factorization_splits_as_hf_peft_does():
    for dimension in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64):
            assert lokr.factorization(dimension, factor) == hf_factorization(dimension, factor), (
                dimension,
                factor,
            )
    assert lokr.factorization(4096) == (64, 64) and lokr.factorization(11008) == (86, 128)


@pytest.mark.parametrize(
    ("fields", "shapes"),
    [
        # 64 -> 32: in = 8 x 8, out = 4 x 8; W2 (8, 8) stays whole while the rank is at least half its side
        ({"rank": 8}, {"lokr_w1": (4, 8), "lokr_w2": (8, 8)}),
        ({"rank": 2}, {"lokr_w1": (4, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}),
        (
            {"rank": 2, "decompose_both": True},
            {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)},
        ),
        ({"rank": 2, "decompose_factor": 2}, {"lokr_w1": (2, 2), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 32)}),
    ],
)
def test_factor_shapes_and_count(fields, shapes):
    config = make_config("lokr", **fields)
    layer = lokr.wrap_layer(nn.Linear(64, 32), config)
    assert {name: tuple(p.shape) for name, p in layer.parts().items()} == shapes
    assert lokr.factor_parameters(64, 32, config) == sum(p.numel() for p in layer.parts().values())


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_fold_follow_the_formula(kind):
    torch.manual_seed(0)
    base = nn.Linear(6, 4) if kind == "linear" else Conv1D(4, 6)
    layer = lokr.wrap_layer(base, make_config("lokr", rank=1, alpha=3.0))  # W2: (2, 3) as a rank-1 product
    for part in layer.parts().values():
        nn.init.normal_(part)
    delta = 3.0 * torch.kron(layer.lokr_w1, layer.lokr_w2_a @ layer.lokr_w2_b)
    weight = base.weight.T if kind == "conv1d" else base.weight
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ (weight + delta).T + base.bias)
    folded = lokr.fold(layer, base.weight)
    torch.testing.assert_close(folded, (weight + delta).T if kind == "conv1d" else weight + delta)


@pytest.mark.parametrize(("init", "zero"), [(True, {"lokr_w1"}), ("lycoris", {"lokr_w2"}), (False, set())])
def test_init_weights_picks_the_zero_factor(init, zero):
    layer = lokr.wrap_layer(nn.Linear(64, 64), make_config("lokr", rank=8, init_weights=init))
    assert {name for name, p in layer.parts().items() if not p.any()} == zero
    model, _ = injected(CASE, "llama", init_weights=init)
    assert torch.equal(logits(model), logits(tiny_model("llama"))) == bool(zero)


def test_rank_dropout_rescales_only_when_asked():
    torch.manual_seed(0)
    for scale in (False, True):
        config = make_config("lokr", rank=2, rank_dropout=0.5, rank_dropout_scale=scale)
        layer = lokr.wrap_layer(nn.Linear(8, 400, bias=False), config)
        for part in layer.parts().values():
            nn.init.normal_(part)
        x = torch.randn(1, 8)
        full = layer.eval()(x)
        dropped = layer.train()(x) - layer.base(x)
        kept = dropped.abs().sum(0) > 0
        factor = 400 / float(kept.sum()) if scale else 1.0
        torch.testing.assert_close(
            dropped[:, kept], (full - layer.base(x))[:, kept] * factor, rtol=1e-4, atol=1e-4
        )


def test_config_fields():
    fields = {
        "peft_type": "LOKR",
        "r": 4,
        "alpha": 8,
        "target_modules": ["q_proj"],
        "init_weights": "lycoris",
    }
    config = lokr.config_from_adapter({**fields, "decompose_factor": 8, "rank_dropout_scale": True})
    assert config == make_config(
        "lokr",
        rank=4,
        alpha=8.0,
        target_modules=["q_proj"],
        init_weights="lycoris",
        decompose_factor=8,
        rank_dropout_scale=True,
    )
    for field, value, message in [
        ("init_weights", "gaussian", "init_weights: expected true, false or lycoris"),
        ("decompose_factor", 0, "decompose_factor: expected -1 or a positive integer"),
        ("rank_pattern", {"q": 2}, "rank_pattern"),
    ]:
        with pytest.raises(UserError, match=message):
            lokr.config_from_adapter({**fields, field: value})
