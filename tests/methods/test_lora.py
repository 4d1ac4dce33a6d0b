"""LoRA against the math and against HF PEFT (the reference) on tiny models of every architecture."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from tiny import (
    ARCHS,
    HF_TASK,
    assert_lora_dropout,
    assert_lora_dtypes,
    assert_lora_formula,
    batch,
    llama_2_7b_config,
    logits,
    one_step_changes,
    randomise,
    task_of,
    tiny_model,
    trainable_names,
)
from transformers import AutoModelForCausalLM

from peftcli.errors import UserError
from peftcli.methods import Context, MethodConfig, lora, make_config, modules
from peftcli.methods.modules import AdapterError
from peftcli.runs import adapter as checkpoint

# LoRA's B starts at zero: a small perturbation already makes a wrong load or a wrong scale show.
NOISE = 0.1


def method(**fields) -> MethodConfig:
    return make_config("lora", **fields)


def injected(arch: str, seed: int = 0, **fields):
    task = task_of(arch)
    model = lora.inject(tiny_model(arch, task, seed=seed), method(**fields), Context(task))
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
    assert modules.count_parameters(model) == hf.get_nb_trainable_parameters()


def test_meta_device_count_llama_7b():
    config = llama_2_7b_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = lora.inject(model, method(rank=8, target_modules=["q_proj", "v_proj"]), Context("causal-lm"))
    assert modules.count_parameters(model) == (4_194_304, 6_742_609_920)
    assert all(layer.lora_A.weight.is_meta for _, layer in lora.lora_layers(model))


def test_factors_follow_base_dtype():
    model = tiny_model("llama").to(torch.bfloat16)
    model = lora.inject(model, method(), Context("causal-lm"))
    _, layer = lora.lora_layers(model)[0]
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.bfloat16
    assert model(**batch()).logits.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# The forward against the formula (peftcli/fast/lora.py's faster forward: tests/fast/test_lora.py)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_has_the_formula_loss_and_gradients(kind):
    assert_lora_formula(kind)


def test_autocast_and_fp32_factors_on_a_half_base():
    assert_lora_dtypes()


def test_dropout_is_skipped_at_zero_and_applied_otherwise():
    assert_lora_dropout()


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


def test_fold_weight_adds_the_scaled_low_rank_product_rounding_once():
    lora_a, lora_b, weight = torch.randn(3, 7), torch.randn(5, 3), torch.randn(5, 7)
    folded = lora.fold_weight(weight, lora_a, lora_b, 0.3, fan_in_fan_out=False)
    torch.testing.assert_close(folded, weight + 0.3 * lora_b @ lora_a)
    torch.testing.assert_close(lora.fold_weight(weight.T, lora_a, lora_b, 0.3, fan_in_fan_out=True), folded.T)
    half = lora.fold_weight(
        weight.bfloat16(), lora_a.bfloat16(), lora_b.bfloat16(), 0.3, fan_in_fan_out=False
    )
    exact = weight.bfloat16().float() + 0.3 * lora_b.bfloat16().float() @ lora_a.bfloat16().float()
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, exact.bfloat16())


def test_merge_refuses_a_tied_weight():
    model = lora.inject(
        tiny_model("gpt2"), method(target_modules=["c_attn", "lm_head"]), Context("causal-lm")
    )
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
    model = lora.inject(tiny_model("llama"), section, Context("causal-lm"))
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
        modules.is_linear(m)
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
        lora.inject(model, method(), Context("causal-lm"))


def test_injecting_twice_is_refused():
    model, task = injected("opt")
    with pytest.raises(UserError, match="already holds LoRA"):
        lora.inject(model, method(), Context(task))


def test_layers_inside_the_trained_head_are_left_to_it():
    model, _ = injected("roberta", target_modules=["dense"])
    names = wrapped(model)
    assert names and not any(n.startswith("classifier") for n in names)
    assert "classifier.dense" not in names
    config = lora.adapter_config(model, method(target_modules=["dense"]), "sequence-classification")
    assert config["target_modules"] == names  # "dense" alone would also reach the head


# --------------------------------------------------------------------------------------------------
# Reading adapter_config.json


@pytest.mark.parametrize("use_dora", [False, True])
def test_method_from_config_inverts_adapter_config(use_dora):
    section = method(
        rank=4, alpha=6.0, dropout=0.05, target_modules=["c_attn"], use_rslora=True, use_dora=use_dora
    )
    model = lora.inject(tiny_model("gpt2"), copy.deepcopy(section), Context("causal-lm"))
    assert lora.config_from_adapter(lora.adapter_config(model, section, "causal-lm")) == section


@pytest.mark.parametrize(
    "field, value",
    [
        ("lora_bias", True),
        ("bias", "all"),
        ("rank_pattern", {"q_proj": 4}),
        ("alpha_pattern", {"q_proj": 4}),
        ("layers_to_transform", [0]),
        ("exclude_modules", ["k_proj"]),
        ("trainable_token_indices", [1, 2]),
        ("init_lora_weights", "nonsense"),
        ("init_lora_weights", "pissa_niter_4"),  # a randomized SVD's residual base cannot be recomputed
        ("use_dora", "yes"),
    ],
)
def test_method_from_config_refuses_what_changes_the_math(field, value):
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], field: value}
    with pytest.raises(UserError, match=field):
        lora.config_from_adapter(config)


def test_method_from_config_ignores_init_only_and_unused_fields():
    config = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["v_proj", "q_proj"],
        "init_lora_weights": "eva",
        "loftq_config": {},
        "eva_config": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "use_dora": False,
        "megatron_core": "megatron.core",
        "layer_replication": None,
        "runtime_config": {"ephemeral_gpu_offload": False},
    }
    section = lora.config_from_adapter(config)
    assert (section.rank, section.alpha, section.init) == (8, 16.0, "kaiming")
    assert section.target_modules == ["q_proj", "v_proj"]


# --------------------------------------------------------------------------------------------------
# LoRA+: the optimizer's learning rates


def _hf_name(name: str) -> str:
    """HF PEFT's parameter name in ours: no adapter name, the trained head copy named ``trained``."""
    name = name.removeprefix("base_model.model.").replace(".default", "")
    return name.replace(".modules_to_save", ".trained").replace(
        "lora_magnitude_vector.weight", "lora_magnitude_vector"
    )


@pytest.mark.parametrize(("arch", "dora"), [("llama", False), ("bert", True)])
def test_loraplus_learning_rates_equal_hf(arch, dora):
    from peft.optimizers import create_loraplus_optimizer

    from peftcli.recipe import Recipe, TrainSection
    from peftcli.train.optim import make_optimizer

    fields = {"rank": 4, "use_dora": dora, "loraplus_lr_ratio": 16.0}
    model, task = injected(arch, **fields)
    recipe = Recipe(method=method(**fields), train=TrainSection(learning_rate=1e-3))
    names = {id(p): name for name, p in model.named_parameters()}
    ours = {
        names[id(p)]: g["lr"] * g["lr_scale"]
        for g in make_optimizer(model, recipe).param_groups
        for p in g["params"]
    }
    hf = peft.get_peft_model(tiny_model(arch, task), hf_config(task, r=4, use_dora=dora))
    hf_names = {id(p): _hf_name(name) for name, p in hf.named_parameters()}
    theirs = create_loraplus_optimizer(hf, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    theirs = {hf_names[id(p)]: g["lr"] for g in theirs.param_groups for p in g["params"]}
    assert ours == theirs
    assert sorted(set(ours.values())) == [1e-3, 16e-3]


def test_without_loraplus_every_parameter_has_the_schedule_s_rate():
    from peftcli.recipe import Recipe, TrainSection
    from peftcli.train.optim import make_optimizer

    model, _ = injected("bert", rank=4)
    recipe = Recipe(method=method(rank=4), train=TrainSection(weight_decay=0.1, learning_rate=2e-4))
    groups = make_optimizer(model, recipe).param_groups
    # the two groups a run always had (checkpoints index the optimizer state by group order)
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.1, 1.0), (0.0, 1.0)]
    assert all(p.ndim == 1 for p in groups[1]["params"]) and all(p.ndim == 2 for p in groups[0]["params"])
