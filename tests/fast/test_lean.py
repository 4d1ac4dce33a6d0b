"""The lean SwiGLU MLP gives the plain MLP's loss and gradients and keeps less for backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import assert_same_step, close, lora_model, loss_and_grads, saved_bytes, tiny_config, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from peftcli.fast import install as install_speedups
from peftcli.fast import lean
from peftcli.fast.checkpointing import enable as enable_activation_checkpointing
from peftcli.methods import METHODS, Context, make_config


@pytest.mark.parametrize(
    "with_lora, with_bias, inputs_grad",
    [(True, True, True), (True, False, True), (False, True, True), (True, True, False)],
)
def test_function_gradients_match_numerical_differentiation(with_lora, with_bias, inputs_grad):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    gate, up = rand(5, 6, grad=inputs_grad), rand(5, 6, grad=inputs_grad)
    weight, bias = rand(4, 6), rand(4) if with_bias else None
    lora_a, lora_b = (rand(3, 6, grad=True), rand(4, 3, grad=True)) if with_lora else (None, None)
    inputs = (gate, up, weight, bias, lora_a, lora_b, 0.7)
    assert torch.autograd.gradcheck(lean._SiluMulDown.apply, inputs)


def test_function_with_up_recomputed_matches_numerical_differentiation():
    g = torch.Generator().manual_seed(0)
    up_proj = nn.Linear(4, 6, dtype=torch.float64).requires_grad_(False)
    with torch.no_grad():
        up_proj.weight.copy_(torch.randn(6, 4, generator=g, dtype=torch.float64))
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 6, generator=g, dtype=torch.float64)
    lora_a = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def mlp(gate, x, lora_a, lora_b):  # backward sees x, not up, and must rebuild up from it
        return lean._SiluMulDown.apply(gate, up_proj(x), weight, None, lora_a, lora_b, 0.7, x, up_proj)

    assert torch.autograd.gradcheck(mlp, (gate, x, lora_a, lora_b))


def test_function_equals_the_textbook_forward_and_backward():
    torch.manual_seed(0)
    gate, up = torch.randn(7, 12, requires_grad=True), torch.randn(7, 12, requires_grad=True)
    weight, bias = torch.randn(5, 12), torch.randn(5)
    lora_a, lora_b = torch.randn(2, 12, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    upstream = torch.randn(7, 5)
    results = []
    for fn in (
        lambda: lean._SiluMulDown.apply(gate, up, weight, bias, lora_a, lora_b, 1.5),
        lambda: (
            F.linear(F.silu(gate) * up, weight, bias) + 1.5 * (F.silu(gate) * up) @ lora_a.t() @ lora_b.t()
        ),
    ):
        out = fn()
        grads = torch.autograd.grad((out * upstream).sum(), (gate, up, lora_a, lora_b))
        results.append((out, *grads))
    for fast, plain in zip(*results, strict=True):
        assert close(fast, plain)


def _labelled():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 200, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _lora(targets="all-linear", dropout=0.0) -> nn.Module:
    return lora_model(target_modules=targets, dropout=dropout)


def _prefix() -> nn.Module:
    method = make_config("prefix-tuning", num_virtual_tokens=3)
    return METHODS["prefix-tuning"].inject(tiny_model("llama", "causal-lm"), method, Context("causal-lm"))


# What the lean forms stop keeping, in (tokens, intermediate) and (tokens, hidden) fp32 tensors over the
# tiny Llama's two layers. MLP: silu's output wherever gate needs a gradient, and the product where LoRA
# on down_proj needs it (with LoRA on down_proj alone, the first layer's gate sees no trainable input and
# the product is kept on both paths). RMSNorm: its input, wherever its output is kept anyway because a
# LoRA factor reads it (all-linear: every norm but the first, which sees no trainable input; q, v: the
# second layer's input norm); elsewhere the norm keeps its output instead of its input, same bytes.
@pytest.mark.parametrize(
    "build, mlp_dropped, norm_dropped",
    [
        (_lora, 4, 3),
        (lambda: _lora(targets=["q_proj", "v_proj"]), 2, 1),
        (lambda: _lora(targets=["down_proj"]), 2, 0),
        (_prefix, 2, 0),
    ],
    ids=["lora-all-linear", "lora-q-v", "lora-down-only", "prefix"],
)
def test_model_step_matches_the_plain_layers(build, mlp_dropped, norm_dropped):
    model, b = build(), _labelled()
    plain_value, plain_grads = loss_and_grads(model, b)
    plain_saved = saved_bytes(model, b)
    assert lean.enable_lean_layers(model) == (2, 5)  # two MLPs; two norms per layer and the final one
    lean_value, lean_grads = loss_and_grads(model, b)
    assert plain_grads.keys() == lean_grads.keys() and plain_grads
    assert_same_step((lean_value, lean_grads), (plain_value, plain_grads))
    config = model.config if hasattr(model, "config") else model.base_model.config
    tokens = b["input_ids"].numel()
    dropped = 4 * tokens * (mlp_dropped * config.intermediate_size + norm_dropped * config.hidden_size)
    assert plain_saved - saved_bytes(model, b) == dropped


def test_falls_back_where_it_cannot_apply():
    b = _labelled()
    model = _lora(dropout=0.1)  # down_proj's dropout mask would have to be stored: plain path
    assert lean._frozen_parts(model.model.layers[0].mlp.down_proj) is None
    lean.enable_lean_layers(model)
    torch.manual_seed(0)
    fast = loss_and_grads(model, b)[0]
    lean.disable_lean_layers(model)
    torch.manual_seed(0)
    assert close(fast, loss_and_grads(model, b)[0])

    model = _lora()
    model.model.layers[0].mlp.down_proj.base.weight.requires_grad_(True)  # trained in full: plain path
    assert lean._frozen_parts(model.model.layers[0].mlp.down_proj) is None
    assert lean._frozen_parts(model.model.layers[1].mlp.down_proj) is not None

    lean.enable_lean_layers(model)
    with torch.no_grad():  # evaluation: the module's own math, same output
        out = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        lean.disable_lean_layers(model)
        assert torch.equal(out, model(**{k: v for k, v in b.items() if k != "labels"}).logits)


def test_only_silu_mlps_and_dividable_norms_are_routed():
    assert lean.enable_lean_layers(tiny_model("gpt2", "causal-lm")) == (0, 0)
    config = tiny_config("llama")
    config.hidden_act = "gelu"
    gelu = AutoModelForCausalLM.from_config(config).requires_grad_(False)
    assert lean.enable_lean_layers(gelu) == (0, 5)  # the norms only
    model = tiny_model("llama", "causal-lm").requires_grad_(False)
    with torch.no_grad():
        model.model.norm.weight[3] = 0.0  # x * r = y / w would divide by zero
    model.model.layers[0].input_layernorm.weight.requires_grad_(True)  # trained: its own forward
    assert lean.enable_lean_layers(model) == (2, 3)


def test_disable_restores_the_class_forward_and_copies_survive():
    model = _lora()
    lean.enable_lean_layers(model)
    twin = copy.deepcopy(model)
    b = _labelled()
    assert close(loss_and_grads(twin, b)[0], loss_and_grads(model, b)[0])
    lean.disable_lean_layers(model)
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("inputs_grad", [True, False])
def test_norm_gradients_match_numerical_differentiation(inputs_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lean._RMSNorm.apply, (x, weight, 1e-6))
    reference = lambda t: weight * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6))  # noqa: E731
    assert torch.allclose(lean._RMSNorm.apply(x, weight, 1e-6), reference(x), rtol=1e-12, atol=1e-12)


def test_lean_layers_under_activation_checkpointing_match_the_plainloss_and_grads():
    model, b = _lora(), _labelled()
    plain_value, plain_grads = loss_and_grads(model, b)
    enable_activation_checkpointing(model)
    lean.enable_lean_layers(model)
    assert_same_step(loss_and_grads(model, b), (plain_value, plain_grads))


def test_recomputed_mlp_matches_the_plain_step_and_keeps_no_mlp_activations():
    model, b = _lora(), _labelled()
    plain_value, plain_grads = loss_and_grads(model, b)
    plain_saved = saved_bytes(model, b)
    assert lean.enable_lean_layers(model, recompute="mlp") == (2, 5)
    assert_same_step(loss_and_grads(model, b), (plain_value, plain_grads))
    # per layer, gate's, silu's and up's outputs, the product, and the (tokens, rank) products of LoRA's
    # A factors on gate, up and down are no longer kept; the MLP's input is the norm's output, kept anyway.
    # The norms drop their inputs as in the lean test above (all-linear: 3).
    config, tokens = model.config, b["input_ids"].numel()
    dropped = 4 * tokens * (2 * (4 * config.intermediate_size + 3 * 4) + 3 * config.hidden_size)
    assert plain_saved - saved_bytes(model, b) == dropped


@pytest.mark.parametrize(
    "targets, up_kept", [("all-linear", 0), (["q_proj", "v_proj"], 0), (["down_proj"], 1)], ids=str
)
def test_recomputed_up_matches_the_plain_step_and_keeps_no_up_output(targets, up_kept):
    model, b = _lora(targets), _labelled()
    plain_value, plain_grads = loss_and_grads(model, b)
    lean.enable_lean_layers(model)
    lean_saved = saved_bytes(model, b)
    lean.disable_lean_layers(model)
    assert lean.enable_lean_layers(model, recompute="up") == (2, 5)
    assert_same_step(loss_and_grads(model, b), (plain_value, plain_grads))
    # up's output, one (tokens, intermediate) tensor per layer, is no longer kept where up needs a
    # gradient; with LoRA on down_proj alone the first layer keeps the product, as the lean form does
    config, tokens = model.config, b["input_ids"].numel()
    assert lean_saved - saved_bytes(model, b) == 4 * tokens * config.intermediate_size * (2 - up_kept)


def test_recomputed_up_repeats_the_forward_exactly():
    # backward's up must be bit for bit the forward's, or gradients drift from the plain path
    model = _lora()
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 12, model.config.hidden_size)
    with torch.no_grad():
        first = mlp.up_proj(x)
    assert torch.equal(mlp.up_proj(x.requires_grad_()), first)
    model = _lora(dropout=0.1)  # dropout draws a new mask each call: up is kept instead
    assert lean._frozen_parts(model.model.layers[1].mlp.up_proj) is None


@pytest.mark.parametrize("value, forward", [("up", "_up_recomputed_forward"), ("mlp", "_recomputed_forward")])
def test_mlp_checkpointing_needs_a_swiglu_model(value, forward):
    from peftcli.errors import UserError
    from peftcli.recipe import TrainSection

    train = TrainSection(gradient_checkpointing=value)
    with pytest.raises(UserError, match=f"train.gradient_checkpointing: {value} .* use true"):
        install_speedups(tiny_model("gpt2", "causal-lm").requires_grad_(False), train, "causal-lm")
    model = _lora()
    install_speedups(model, train, "causal-lm")
    assert vars(model.model.layers[0].mlp)["forward"].__func__ is getattr(lean, forward)


def test_auto_recomputes_up_where_it_applies_and_nothing_elsewhere():
    from peftcli.recipe import TrainSection

    train = TrainSection()
    assert train.gradient_checkpointing == "auto"
    model = _lora()
    install_speedups(model, train, "causal-lm")
    assert vars(model.model.layers[0].mlp)["forward"].__func__ is lean._up_recomputed_forward
    gpt2 = tiny_model("gpt2", "causal-lm").requires_grad_(False)
    install_speedups(gpt2, train, "causal-lm")  # no SwiGLU MLP: no error, nothing recomputed
    assert not gpt2.is_activation_checkpointing
    model = _lora()
    install_speedups(model, TrainSection(gradient_checkpointing=False), "causal-lm")
    assert vars(model.model.layers[0].mlp)["forward"].__func__ is lean._lean_forward
