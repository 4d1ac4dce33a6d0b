"""DoRA (`lora` with use_dora) against the paper's formula and against HF PEFT on tiny models."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny import (
    ARCHS,
    HF_TASK,
    assert_lora_dtypes,
    batch,
    logits,
    loss_and_grads,
    one_step_changes,
    randomise,
    task_of,
    tiny_model,
    trainable_names,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftcli import fast
from peftcli.fast import lora as fast_lora
from peftcli.methods import Context, lora, make_config, modules
from peftcli.recipe import TrainSection
from peftcli.runs import adapter as checkpoint

NOISE = 0.1


def method(**fields):
    return make_config("lora", **{"rank": 4, "alpha": 8.0, "use_dora": True, **fields})


def injected(arch: str, **fields):
    task = task_of(arch)
    return lora.inject(tiny_model(arch, task), method(**fields), Context(task)), task


def hf_model(arch: str, **fields):
    task = task_of(arch)
    config = peft.LoraConfig(task_type=HF_TASK[task], r=4, lora_alpha=8, use_dora=True, **fields)
    return peft.get_peft_model(tiny_model(arch, task), config), task


# --------------------------------------------------------------------------------------------------
# The layer against the formula


def dora_layer(base: nn.Module, install=None, **fields) -> nn.Module:
    """A DoRA layer with a random B and magnitude, through `install`'s forward (None: the plain one)."""
    torch.manual_seed(0)
    layer = lora.wrap_layer(base, **{"rank": 3, "alpha": 6.0, "use_dora": True, **fields})
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.rand(layer.out_features) + 0.5)
    if install is not None:
        install(layer)
    return layer


# the plain forward (methods/lora.py) and the training step's (fast/lora.py), frozen products on oneDNN or MKL
FORWARDS = {
    "plain": None,
    "fast-onednn": fast_lora.install,
    "fast-mkl": lambda layer: fast_lora.install(layer, onednn=False),
}


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_is_magnitude_times_direction_with_the_norm_detached(kind, forward):
    base = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    layer = dora_layer(base.requires_grad_(False), FORWARDS[forward])
    a, b, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    x = torch.randn(3, 5, 12, requires_grad=True)
    target = torch.randn(3, 5, 10)

    def formula(x, detach=True):
        weight = base.weight.T if kind == "conv1d" else base.weight  # (out, in)
        adapted = weight + layer.scale * b @ a
        norm = adapted.norm(dim=1)  # ||V + dV||, one per output row
        return x @ ((m / (norm.detach() if detach else norm))[:, None] * adapted).T + base.bias

    def loss_grads(forward):
        loss = ((forward(x) - target) ** 2).sum()
        return [loss.detach(), *torch.autograd.grad(loss, [x, a, b, m])]

    ours = loss_grads(layer)
    for value, reference in zip(ours, loss_grads(formula), strict=True):
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-5)
    # The detached norm matters: differentiated through, the factors' gradients differ.
    through = loss_grads(lambda x: formula(x, detach=False))
    assert not torch.allclose(ours[2], through[2], rtol=1e-3, atol=1e-3)


def test_magnitude_starts_at_the_row_norms_and_the_layer_at_the_base():
    base = Conv1D(10, 12)
    layer = lora.wrap_layer(base, rank=3, alpha=6.0, use_dora=True)
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), base.weight.norm(dim=0))
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    assert layer.label == "DoRALinear" and layer.run is lora.run_dora


def test_a_zero_row_stays_zero_instead_of_nan():
    base = nn.Linear(6, 4)
    with torch.no_grad():
        base.weight[2] = 0.0  # a pruned unit: its norm is 0, and so is its magnitude
    layer = lora.wrap_layer(base, rank=2, alpha=4.0, use_dora=True)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x))
    merged = lora.fold(layer, base.weight)
    assert torch.isfinite(merged).all() and not merged[2].any()


@pytest.mark.parametrize("forward", FORWARDS)
def test_dropout_is_applied_in_training_only(forward):
    layer = dora_layer(nn.Linear(8, 8), FORWARDS[forward], dropout=0.5)
    x = torch.randn(4, 8)
    layer.eval()
    clean = layer(x)
    layer.train()
    torch.manual_seed(0)
    noisy = layer(x)
    assert not torch.allclose(noisy, clean)
    torch.manual_seed(0)  # the same mask: y = W x + b + (f - 1) W h + f s B A h, h = dropout(x)
    h = layer.dropout(x)
    factor = layer.lora_magnitude_vector / lora.weight_norm(layer)
    weight = layer.base.weight
    expected = (
        layer.base(x) + (factor - 1) * (h @ weight.T) + factor * layer.scale * layer.lora_B(layer.lora_A(h))
    )
    torch.testing.assert_close(noisy, expected)


@pytest.mark.parametrize("forward", FORWARDS)
def test_half_precision_base_with_float32_parts_and_autocast(forward):
    assert_lora_dtypes(FORWARDS[forward], use_dora=True)


# --------------------------------------------------------------------------------------------------
# The wrapped model


@pytest.mark.parametrize("arch", ARCHS)
def test_output_equals_base_at_init_and_only_the_parts_train(arch):
    model, task = injected(arch)
    torch.testing.assert_close(logits(model), logits(tiny_model(arch, task)), rtol=1e-5, atol=1e-5)
    trainable = trainable_names(model)
    parts = {n for n in trainable if n.endswith(("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))}
    assert trainable - parts == {n for n in trainable if ".trained." in n}
    assert {n for n in trainable if "magnitude" in n} <= one_step_changes(model, task) <= trainable


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_equal_hf(arch):
    model, _ = injected(arch)
    hf, _ = hf_model(arch)
    assert modules.count_parameters(model) == hf.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_peft_loads_our_adapter(arch, tmp_path):
    model, task = injected(arch)
    randomise(model, NOISE)
    checkpoint.save_adapter(model, method(), task, "tiny", tmp_path)
    hf = peft.PeftModel.from_pretrained(tiny_model(arch, task), tmp_path)
    assert hf.peft_config["default"].use_dora
    assert torch.max(torch.abs(logits(hf) - logits(model))) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_we_load_hf_peft_adapter(arch, tmp_path):
    hf, task = hf_model(arch, lora_dropout=0.1)
    randomise(hf, NOISE)
    hf.save_pretrained(tmp_path)
    loaded, section = checkpoint.load_adapter(tiny_model(arch, task), tmp_path)
    assert section.use_dora and (section.rank, section.alpha, section.dropout) == (4, 8.0, 0.1)
    assert torch.max(torch.abs(logits(loaded.eval()) - logits(hf.eval()))) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_mode_with_dropout_equals_hf(arch, tmp_path):
    # With dropout active HF PEFT rescales W dropout(x) and keeps W x: so does ours. Same seed, same masks:
    # each LoRA layer draws one mask for its input, where HF PEFT's does (GPT-2's own dropouts draw too).
    hf, task = hf_model(arch, lora_dropout=0.3)
    randomise(hf, NOISE)
    hf.save_pretrained(tmp_path)
    loaded, _ = checkpoint.load_adapter(tiny_model(arch, task), tmp_path)
    outputs = []
    for model in (hf, loaded):
        model.train()
        torch.manual_seed(7)
        outputs.append(model(**batch()).logits.detach())
    assert torch.max(torch.abs(outputs[0] - outputs[1])) <= 1e-5
    assert not torch.allclose(outputs[1], logits(loaded.eval()))  # the masks did something


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_unmerged_and_hf_merge(arch, tmp_path):
    model, task = injected(arch)
    randomise(model, NOISE)
    expected = logits(model)
    checkpoint.save_adapter(model, method(), task, "tiny", tmp_path)
    merged = lora.merge(model)
    assert torch.max(torch.abs(logits(merged) - expected)) <= 1e-5
    hf = peft.PeftModel.from_pretrained(tiny_model(arch, task), tmp_path).merge_and_unload()
    ours, theirs = merged.state_dict(), hf.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.max(torch.abs(ours[key] - theirs[key])) <= 1e-6, key


def test_method_from_config_inverts_adapter_config():
    section = method(target_modules=["c_attn"])
    model = lora.inject(tiny_model("gpt2"), method(target_modules=["c_attn"]), Context("causal-lm"))
    fields = lora.adapter_config(model, section, "causal-lm")
    assert fields["use_dora"] is True and lora.config_from_adapter(fields) == section


# --------------------------------------------------------------------------------------------------
# The training step's speed-ups on a DoRA model


def test_training_step_paths_match_the_plain_step():
    model, _ = injected("llama", target_modules="all-linear")
    randomise(model, NOISE)
    b = {**batch(), "labels": batch()["input_ids"]}
    plain = loss_and_grads(model, b)
    # lean layers: down_proj is DoRA here, which the lean MLP must not take for plain LoRA
    installed = fast.install(model, TrainSection(), "causal-lm")
    try:
        assert all(layer.run.func is fast_lora.dora_forward for _, layer in lora.lora_layers(model))
        step = loss_and_grads(model, b, installed.loss)
    finally:
        installed.undo()
    assert all(layer.run is lora.run_dora for _, layer in lora.lora_layers(model))
    (value, grads), (plain_value, plain_grads) = step, plain
    torch.testing.assert_close(value, plain_value, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
