"""LoRA against the math and against HF PEFT (the reference) on tiny models of every architecture."""

from __future__ import annotations

import copy
import math
from collections import Counter

import peft
import pytest
import torch
from tiny import (
    ARCHS,
    HF_TASK,
    batch,
    llama_2_7b_config,
    logits,
    one_step_changes,
    randomise,
    task_of,
    tiny_model,
    trainable_names,
)
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from peftcli import checkpoint
from peftcli.errors import UserError
from peftcli.methods import common, lora
from peftcli.methods.common import AdapterError
from peftcli.recipe import MethodSection

# LoRA's B starts at zero: a small perturbation already makes a wrong load or a wrong scale show.
NOISE = 0.1


def method(**fields) -> MethodSection:
    return MethodSection(name="lora", **fields)


def injected(arch: str, seed: int = 0, **fields):
    task = task_of(arch)
    model = lora.inject(tiny_model(arch, task, seed=seed), method(**fields), task)
    return model, task


def hf_config(task: str, **fields) -> peft.LoraConfig:
    return peft.LoraConfig(task_type=HF_TASK[task], **fields)


# --------------------------------------------------------------------------------------------------
# Properties of the wrapped model


@pytest.mark.parametrize("arch", ARCHS)
def test_output_equals_base_at_init(arch):
    base = logits(tiny_model(arch, task_of(arch)))
    model, _ = injected(arch)
    assert lora.lora_layers(model)
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_lora_and_head_train_and_one_step_changes_only_them(arch):
    model, task = injected(arch)
    trainable = trainable_names(model)
    head = {n for n in trainable if ".trained." in n}
    assert trainable - head == {n for n in trainable if n.endswith(("lora_A.weight", "lora_B.weight"))}
    assert bool(head) == (task == "sequence-classification")
    changed = one_step_changes(model, task)
    assert changed <= trainable
    assert {n for n in trainable if "lora_B" in n} <= changed


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_equal_hf(arch):
    model, task = injected(arch)
    hf = peft.get_peft_model(tiny_model(arch, task), hf_config(task, r=8, target_modules=None))
    assert common.count_parameters(model) == hf.get_nb_trainable_parameters()


def test_meta_device_count_llama_7b():
    config = llama_2_7b_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = lora.inject(model, method(rank=8, target_modules=["q_proj", "v_proj"]), "causal-lm")
    assert common.count_parameters(model) == (4_194_304, 6_742_609_920)
    assert all(layer.lora_A.weight.is_meta for _, layer in lora.lora_layers(model))


def test_factors_follow_base_dtype():
    model = tiny_model("llama").to(torch.bfloat16)
    model = lora.inject(model, method(), "causal-lm")
    _, layer = lora.lora_layers(model)[0]
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.bfloat16
    assert model(**batch()).logits.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# The efficient forward against the plain formula


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_inplace_forward_has_the_plain_formula_loss_and_gradients(kind):
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    layer = lora.LoRALinear(base, rank=4, alpha=8.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 12, requires_grad=True)  # x needs grad, as after an earlier adapted layer
    target = torch.randn(3, 5, 10)

    def plain(x):
        weight = base.weight.T if kind == "conv1d" else base.weight
        lora_path = (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
        return x @ weight.T + base.bias + layer.scale * lora_path

    grads = []
    for forward in (layer, plain):
        loss = ((forward(x) - target) ** 2).sum()
        grads.append(
            (loss.detach(), *torch.autograd.grad(loss, [x, layer.lora_A.weight, layer.lora_B.weight]))
        )
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert layer.scale == 2.0


def graph_ops(tensor: torch.Tensor) -> Counter[str]:
    """How many nodes of each type the autograd graph of `tensor` has."""
    ops, seen, stack = Counter(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            ops[type(node).__name__] += 1
            stack.extend(next_node for next_node, _ in node.next_functions)
    return ops


@pytest.mark.parametrize("base", [nn.Linear(12, 10), Conv1D(10, 12)], ids=["linear", "conv1d"])
def test_forward_adds_in_place_without_a_gradient_copy(base):
    # The low-rank term goes into the base output with one addmm_; an in-place add on a view would
    # record CopySlices (a full-size gradient copy), and the plain formula a full-size Mul.
    layer = lora.LoRALinear(base.requires_grad_(False), rank=4, alpha=8.0)
    ops = graph_ops(layer(torch.randn(3, 5, 12, requires_grad=True)))
    # two products: the frozen base's (a Linear's through oneDNN, see frozen_linear) and the low-rank add
    if isinstance(base, nn.Linear):
        assert ops["_FrozenLinearBackward"] == 1 and ops["AddmmBackward0"] == 1
    else:
        assert ops["AddmmBackward0"] == 2
    assert not ops.keys() & {"CopySlices", "MulBackward0", "AddBackward0"}


def test_autocast_and_fp32_factors_on_a_half_base():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(16, 8), rank=4, alpha=8.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 16)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    half = lora.LoRALinear(nn.Linear(16, 8).bfloat16(), rank=4, alpha=8.0)
    half.lora_A.float(), half.lora_B.float()  # a trainer may keep the factors in fp32
    half(x.bfloat16()).float().sum().backward()
    assert half.lora_B.weight.grad.dtype == torch.float32


def test_dropout_is_skipped_at_zero_and_applied_otherwise():
    assert lora.LoRALinear(nn.Linear(8, 8), 2, 4.0, dropout=0.0).dropout is None
    layer = lora.LoRALinear(nn.Linear(8, 8), 2, 4.0, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 8)
    layer.train()
    torch.manual_seed(0)
    noisy = layer(x)
    layer.eval()
    assert not torch.allclose(noisy, layer(x))


# --------------------------------------------------------------------------------------------------
# Save / load, ours and HF PEFT's


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    model, task = injected(arch, alpha=32.0)
    randomise(model, NOISE)
    expected = logits(model)
    checkpoint.save_adapter(model, method(alpha=32.0), task, "tiny", tmp_path)
    loaded, loaded_method = checkpoint.load_adapter(tiny_model(arch, task), tmp_path)
    assert loaded_method.alpha == 32.0 and loaded_method.rank == 8
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_peft_loads_our_adapter(arch, tmp_path):
    model, task = injected(arch, rank=4, alpha=12.0)
    randomise(model, NOISE)
    checkpoint.save_adapter(model, method(rank=4, alpha=12.0), task, "tiny", tmp_path)
    hf = peft.PeftModel.from_pretrained(tiny_model(arch, task), tmp_path)
    assert torch.max(torch.abs(logits(hf) - logits(model))) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_we_load_hf_peft_adapter(arch, tmp_path):
    task = task_of(arch)
    hf = peft.get_peft_model(tiny_model(arch, task), hf_config(task, r=4, lora_alpha=8, lora_dropout=0.1))
    randomise(hf, NOISE)
    hf.save_pretrained(tmp_path)
    hf.eval()
    loaded, loaded_method = checkpoint.load_adapter(tiny_model(arch, task), tmp_path)
    assert (loaded_method.rank, loaded_method.alpha, loaded_method.dropout) == (4, 8.0, 0.1)
    loaded.eval()
    assert torch.max(torch.abs(logits(loaded) - logits(hf))) <= 1e-5


def test_rslora_and_gaussian_against_hf(tmp_path):
    model, task = injected("llama", rank=4, alpha=8.0, use_rslora=True, init="gaussian")
    _, layer = lora.lora_layers(model)[0]
    assert layer.scale == 8.0 / math.sqrt(4)
    # HF PEFT's gaussian init: A ~ N(0, 1/r), i.e. std 1/r = 0.25 here (256 samples: within 15%).
    assert abs(layer.lora_A.weight.std().item() - 0.25) < 0.15 * 0.25
    assert not layer.lora_B.weight.any()
    randomise(model, NOISE)
    section = method(rank=4, alpha=8.0, use_rslora=True, init="gaussian")
    checkpoint.save_adapter(model, section, task, "tiny", tmp_path)
    hf = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert hf.peft_config["default"].use_rslora and hf.peft_config["default"].init_lora_weights == "gaussian"
    assert torch.max(torch.abs(logits(hf) - logits(model))) <= 1e-5
    loaded, loaded_method = checkpoint.load_adapter(tiny_model("llama"), tmp_path)
    assert loaded_method.use_rslora and loaded_method.init == "gaussian"


def test_load_refuses_missing_and_misshaped_keys():
    model, _ = injected("llama")
    state = lora.adapter_state(model)
    key = next(iter(state))
    with pytest.raises(AdapterError, match="missing"):
        lora.load_adapter_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(AdapterError, match="shape"):
        lora.load_adapter_state(model, {**state, key: torch.zeros(3, 3)})


# --------------------------------------------------------------------------------------------------
# Merge


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_unmerged_and_hf_merge(arch, tmp_path):
    model, task = injected(arch)
    randomise(model, NOISE)
    expected = logits(model)
    checkpoint.save_adapter(model, method(), task, "tiny", tmp_path)
    merged = lora.merge(model)
    names = {type(m).__module__ for m in merged.modules()}
    assert not any(n.startswith("peftcli") for n in names)
    assert torch.max(torch.abs(logits(merged) - expected)) <= 1e-5
    hf = peft.PeftModel.from_pretrained(tiny_model(arch, task), tmp_path).merge_and_unload()
    ours, theirs = merged.state_dict(), hf.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.max(torch.abs(ours[key] - theirs[key])) <= 1e-6, key


def test_delta_weight_is_the_low_rank_product():
    lora_a, lora_b = torch.randn(3, 7), torch.randn(5, 3)
    delta = lora.delta_weight(lora_a, lora_b, 0.5, fan_in_fan_out=False)
    torch.testing.assert_close(delta, 0.5 * lora_b @ lora_a)
    torch.testing.assert_close(lora.delta_weight(lora_a, lora_b, 0.5, fan_in_fan_out=True), delta.T)
    half = lora.delta_weight(lora_a.bfloat16(), lora_b.bfloat16(), 0.5, fan_in_fan_out=False)
    assert half.dtype == torch.float32


def test_merge_refuses_a_tied_weight():
    model = lora.inject(tiny_model("gpt2"), method(target_modules=["c_attn", "lm_head"]), "causal-lm")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(UserError, match="lm_head.*shared"):
        lora.merge(model)
    assert lora.lora_layers(model) and all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------------------------------
# Choosing the layers


def wrapped(model) -> list[str]:
    return [name for name, _ in lora.lora_layers(model)]


def test_target_forms_names_suffixes_regex():
    by_name, _ = injected("llama", target_modules=["q_proj", "o_proj"])
    assert wrapped(by_name) == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "o_proj")
    ]
    by_suffix, _ = injected("llama", target_modules=["mlp.up_proj"])
    assert wrapped(by_suffix) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    by_regex, _ = injected("llama", target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    assert wrapped(by_regex) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_a_regex_subset_is_written_as_full_names_hf_can_load(tmp_path):
    section = method(target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    model = lora.inject(tiny_model("llama"), section, "causal-lm")
    config = lora.adapter_config(model, section, "causal-lm")
    assert config["target_modules"] == wrapped(model)
    randomise(model, NOISE)
    checkpoint.save_adapter(model, section, "causal-lm", "tiny", tmp_path)
    hf = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert torch.max(torch.abs(logits(hf) - logits(model))) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "roberta"])
def test_all_linear_leaves_out_output_and_classifier_heads(arch):
    model, _ = injected(arch, target_modules="all-linear")
    names = wrapped(model)
    assert names and not any(n.startswith(("lm_head", "classifier", "score")) for n in names)
    assert len(names) == sum(
        common.is_linear(m)
        for n, m in tiny_model(arch, task_of(arch)).named_modules()
        if not n.startswith(("lm_head", "classifier", "score"))
    )


def test_default_targets_and_config_fields():
    model, _ = injected("gpt2")
    config = lora.adapter_config(model, method(), "causal-lm")
    assert config["target_modules"] == ["c_attn"] and config["fan_in_fan_out"] is True
    assert config["modules_to_save"] is None and config["bias"] == "none" and config["use_dora"] is False
    model, _ = injected("bert")
    config = lora.adapter_config(model, method(), "sequence-classification")
    assert config["target_modules"] == ["query", "value"] and config["fan_in_fan_out"] is False
    assert config["modules_to_save"] == ["classifier", "score"]


def test_no_match_lists_names_and_suggests():
    with pytest.raises(UserError, match=r"`q_prj` matches no layer \(did you mean `q_proj`\?\).*v_proj"):
        injected("llama", target_modules=["q_prj"])


def test_rank_larger_than_a_layer_is_refused():
    # tiny llama: hidden 64, two key/value heads of 16 -> v_proj is 64 -> 32
    with pytest.raises(UserError, match=r"method\.rank: 40 .*`model\.layers\.0\.self_attn\.v_proj`.*<= 32"):
        injected("llama", rank=40)


def test_unknown_model_type_needs_target_modules():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(UserError, match="set method.target_modules"):
        lora.inject(model, method(), "causal-lm")


def test_injecting_twice_is_refused():
    model, task = injected("opt")
    with pytest.raises(UserError, match="already holds LoRA"):
        lora.inject(model, method(), task)


def test_layers_inside_the_trained_head_are_left_to_it():
    model, _ = injected("roberta", target_modules=["dense"])
    names = wrapped(model)
    assert names and not any(n.startswith("classifier") for n in names)
    assert "classifier.dense" not in names
    config = lora.adapter_config(model, method(target_modules=["dense"]), "sequence-classification")
    assert config["target_modules"] == names  # "dense" alone would also reach the head


# --------------------------------------------------------------------------------------------------
# Reading adapter_config.json


def test_method_from_config_inverts_adapter_config():
    section = method(rank=4, alpha=6.0, dropout=0.05, target_modules=["c_attn"], use_rslora=True)
    model = lora.inject(tiny_model("gpt2"), copy.deepcopy(section), "causal-lm")
    assert lora.method_from_config(lora.adapter_config(model, section, "causal-lm")) == section


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_dora", True),
        ("lora_bias", True),
        ("bias", "all"),
        ("rank_pattern", {"q_proj": 4}),
        ("alpha_pattern", {"q_proj": 4}),
        ("layers_to_transform", [0]),
        ("exclude_modules", ["k_proj"]),
        ("trainable_token_indices", [1, 2]),
        ("init_lora_weights", "nonsense"),
    ],
)
def test_method_from_config_refuses_what_changes_the_math(field, value):
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], field: value}
    with pytest.raises(UserError, match=field):
        lora.method_from_config(config)


def test_method_from_config_ignores_init_only_and_unused_fields():
    config = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["v_proj", "q_proj"],
        "init_lora_weights": "pissa_niter_4",
        "loftq_config": {},
        "eva_config": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "use_dora": False,
        "megatron_core": "megatron.core",
        "layer_replication": None,
        "runtime_config": {"ephemeral_gpu_offload": False},
    }
    section = lora.method_from_config(config)
    assert (section.rank, section.alpha, section.init) == (8, 16.0, "kaiming")
    assert section.target_modules == ["q_proj", "v_proj"]
