"""Every method on a quantized base trains as on its dequantized weights: the quantized layers are one more
kind of frozen linear under the methods (quant/product.py's gradient flows to the input).

Oracle: the same model with every quantized layer replaced by a dense nn.Linear holding its dequantized
weight (quant/convert.dequantize_model). Same weights, same products: loss and every gradient agree to the
order of a float32 sum (tiny.close: 1e-5).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import assert_same_step, batch, loss_and_grads, randomise, tiny_config
from transformers import AutoModelForCausalLM

from peftcli import fast
from peftcli.methods import METHODS, Context, make_config
from peftcli.quant import convert
from peftcli.recipe import TrainSection

KINDS = ["int8", "int4", "nf4"]
FIELDS = {"lora": {"rank": 4, "target_modules": "all-linear"}}


def quantized_llama(kind: str) -> torch.nn.Module:
    """A tiny Llama with biases everywhere (BitFit needs some), its linear layers quantized as `kind`."""
    config = tiny_config("llama")
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    convert.quantize_model(model, kind, torch.float32)
    return model


def with_method(model: torch.nn.Module, name: str) -> torch.nn.Module:
    torch.manual_seed(1)
    model = METHODS[name].inject(model, make_config(name, **FIELDS.get(name, {})), Context("causal-lm"))
    randomise(model, scale=0.05)  # LoRA's B, an adapter's up: zero at init would hide them
    return model


def labelled() -> dict:
    b = batch()
    return {**b, "labels": b["input_ids"].clone()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_on_a_quantized_base_matches_the_dequantized_oracle(kind, method):
    base = quantized_llama(kind)
    oracle = convert.dequantize_model(copy.deepcopy(base), torch.float32)
    assert not any(convert.is_quantized(m) for m in oracle.modules())
    ours, theirs = with_method(base, method), with_method(oracle, method)
    assert_same_step(loss_and_grads(ours, labelled()), loss_and_grads(theirs, labelled()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("recompute", ["auto", False, "mlp", True])
def test_training_speedups_on_a_quantized_base_match_the_plain_step(kind, recompute):
    """fast.install's LoRA forward, lean MLP (down_proj quantized) and recompute modes on quantized layers:
    the plain step's loss and gradients."""
    model = with_method(quantized_llama(kind), "lora")
    plain = loss_and_grads(model, labelled())
    installed = fast.install(model, TrainSection(gradient_checkpointing=recompute), "causal-lm")
    model.train()
    try:
        assert_same_step(loss_and_grads(model, labelled(), installed.loss), plain)
    finally:
        installed.undo()


def test_parameter_counts_count_what_a_quantized_weight_stands_for():
    """As HF PEFT counts bitsandbytes' packed 4-bit weights: out x in each, whatever the storage."""
    from peftcli.methods.modules import count_parameters

    for kind in KINDS:
        model = quantized_llama(kind)
        dense = convert.dequantize_model(copy.deepcopy(model), torch.float32)
        assert (
            count_parameters(model)[1]
            == count_parameters(dense)[1]
            == sum(p.numel() for p in dense.parameters())
        )


@pytest.mark.parametrize("kind", KINDS)
def test_dora_on_a_quantized_base_matches_the_dequantized_oracle(kind):
    """DoRA's norm and direction read the base weight: a quantized one is dequantized for them."""
    base = quantized_llama(kind)
    oracle = convert.dequantize_model(copy.deepcopy(base), torch.float32)
    fields = {**FIELDS["lora"], "use_dora": True}
    models = []
    for model in (base, oracle):
        torch.manual_seed(1)
        models.append(METHODS["lora"].inject(model, make_config("lora", **fields), Context("causal-lm")))
        randomise(models[-1], scale=0.05)
    assert_same_step(loss_and_grads(models[0], labelled()), loss_and_grads(models[1], labelled()))


def test_an_init_that_rewrites_the_base_weight_is_refused_on_a_quantized_base():
    from peftcli.errors import UserError

    with pytest.raises(UserError, match="method.init: pissa rewrites the weight of .*model.quantize"):
        METHODS["lora"].inject(
            quantized_llama("int4"), make_config("lora", **FIELDS["lora"], init="pissa"), Context("causal-lm")
        )
