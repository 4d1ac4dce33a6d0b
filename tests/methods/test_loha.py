"""LoHa against the math and against HF PEFT (the reference) on tiny models."""

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
from tiny import batch, logits, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftcli.errors import UserError
from peftcli.methods import loha, make_config

CASE = Case(
    "loha",
    {"rank": 4, "alpha": 6.0},
    peft.LoHaConfig,
    {"r": 4, "alpha": 6},
    parts=("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    hf_archs=("llama", "bert"),
    hf_random_init={"init_weights": False},
)


class TestAgainstHfPeft(CommonChecks):
    cases = {"rank4": CASE}


def test_gpt2_conv1d_is_adapted_here_and_refused_by_hf_peft(tmp_path):
    assert_hf_refuses_conv1d(CASE, tmp_path)


# --------------------------------------------------------------------------------------------------
# The math


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_fold_follow_the_formula(kind):
    torch.manual_seed(0)
    base = nn.Linear(6, 5) if kind == "linear" else Conv1D(5, 6)
    layer = loha.wrap_layer(base, make_config("loha", rank=2, alpha=3.0))
    assert layer.hada_w1_a.shape == (5, 2) and layer.hada_w1_b.shape == (2, 6)
    assert not layer.hada_w2_b.any()
    for part in layer.parts().values():
        nn.init.normal_(part)
    delta = 1.5 * (layer.hada_w1_a @ layer.hada_w1_b) * (layer.hada_w2_a @ layer.hada_w2_b)
    weight = base.weight.T if kind == "conv1d" else base.weight
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ (weight + delta).T + base.bias)
    folded = loha.fold(layer, base.weight)
    torch.testing.assert_close(folded, (weight + delta).T if kind == "conv1d" else weight + delta)


def test_rank_dropout_drops_rows_and_rescales_the_rest_in_training_only():
    torch.manual_seed(0)
    layer = loha.wrap_layer(nn.Linear(8, 400, bias=False), make_config("loha", rank_dropout=0.5))
    for part in layer.parts().values():
        nn.init.normal_(part)
    x = torch.randn(1, 8)
    full = layer.eval()(x) - layer.base(x)  # eval mode: no dropout
    layer.train()
    dropped = layer(x) - layer.base(x)
    zero = dropped.abs().sum(0) == 0
    assert 120 < int(zero.sum()) < 280  # about half the 400 output features
    kept = 400 / float((~zero).sum())  # each kept row scaled by 1 / the kept fraction
    torch.testing.assert_close(dropped[:, ~zero], full[:, ~zero] * kept, rtol=1e-4, atol=1e-4)


def test_module_dropout_skips_the_whole_update_sometimes_in_training():
    model, _ = injected(CASE, "llama", module_dropout=0.5)
    for _, layer in loha.loha_layers(model):
        nn.init.normal_(layer.hada_w2_b)
    base = logits(tiny_model("llama"))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        runs = [model.model.layers[0].self_attn.q_proj(torch.ones(1, 64)) for _ in range(40)]
    plain = model.model.layers[0].self_attn.q_proj.base(torch.ones(1, 64))
    skipped = sum(torch.equal(r, plain) for r in runs)
    assert 8 < skipped < 32
    model.eval()
    assert not torch.equal(logits(model), base)


def test_init_weights_false_starts_away_from_the_base():
    model, _ = injected(CASE, "llama", init_weights=False)
    assert (logits(model) - logits(tiny_model("llama"))).abs().max() > 1e-4
    assert model(**batch()).logits.shape[-1] == tiny_model("llama").config.vocab_size


def test_config_from_adapter_refuses_what_changes_the_math():
    fields = {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": ["q_proj"]}
    for field, value in [
        ("rank_pattern", {"q_proj": 2}),
        ("alpha_pattern", {"q": 1}),
        ("exclude_modules", ["k"]),
    ]:
        with pytest.raises(UserError, match=field):
            loha.config_from_adapter({**fields, field: value})
    with pytest.raises(UserError, match="alpha: expected a positive number"):
        loha.config_from_adapter({**fields, "alpha": 0})
    config = loha.config_from_adapter({**fields, "use_effective_conv2d": True, "rank_dropout": 0.1})
    assert config == make_config("loha", rank=4, alpha=8.0, rank_dropout=0.1, target_modules=["q_proj"])
