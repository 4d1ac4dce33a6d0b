"""Prefix tuning against HF PEFT (the reference) on tiny models of every architecture.

Two places where HF PEFT 0.21.2 cannot be run as is with transformers 5.24 (it still passes the cache as
``past_key_values``, renamed ``cache``):
- sequence classification: its forward refuses every model ("does not support past key values"); the
  reference there is HF PEFT's own prefix cache (``get_prompt``) fed to the base model, i.e. its forward
  under the new name;
- ``generate``: the base model's own ``cache`` wins over the prefix, so HF's tokens ignore the adapter; the
  reference is greedy decoding step by step through HF PEFT's forward (which does apply the prefix).
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from tiny import (
    ARCHS,
    DECODERS,
    HF_TASK,
    PROMPT_LEARNING_FIELDS,
    batch,
    check_generate_from_embeds_and_beams,
    copy_heads_into_hf,
    greedy_without_cache,
    logits,
    one_step_changes,
    positions_from_mask,
    randomise,
    saved_configs,
    task_of,
    tiny_config,
    tiny_model,
    trainable_names,
)
from transformers import AutoModelForCausalLM

from peftcli.errors import UserError
from peftcli.methods import Context, MethodConfig, by_peft_type, make_config, prefix
from peftcli.methods.modules import AdapterError, count_parameters
from peftcli.methods.virtual import VirtualTokenModel
from peftcli.runs import adapter as checkpoint

P = 4  # virtual tokens
CASES = [(arch, task_of(arch)) for arch in ARCHS]


def method(**fields) -> MethodConfig:
    return make_config("prefix-tuning", num_virtual_tokens=P, **fields)


def injected(arch: str, task: str, seed: int = 0, **fields) -> VirtualTokenModel:
    return prefix.inject(tiny_model(arch, task, seed=seed), method(**fields), Context(task))


def hf_model(arch: str, task: str, **fields) -> peft.PeftModel:
    config = peft.PrefixTuningConfig(task_type=HF_TASK[task], num_virtual_tokens=P, **fields)
    return peft.get_peft_model(tiny_model(arch, task), config)


def copy_into_hf(ours: VirtualTokenModel, hf: peft.PeftModel) -> None:
    """Give HF PEFT's model our prefix encoder's and heads' weights."""
    hf.prompt_encoder["default"].load_state_dict(ours.prefix_encoder.state_dict())
    copy_heads_into_hf(ours.base_model, hf)


def extended_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(mask.shape[0], P, dtype=mask.dtype), mask], dim=1)


@torch.no_grad()
def hf_logits(model: peft.PeftModel, task: str, **inputs) -> torch.Tensor:
    """HF PEFT's logits; for classification its prefix cache through the base model (see the module doc)."""
    if task == "causal-lm":
        return model(**inputs).logits
    mask = extended_mask(inputs["attention_mask"])
    cache = model.get_prompt(inputs["input_ids"].shape[0])
    return model.base_model(input_ids=inputs["input_ids"], attention_mask=mask, cache=cache).logits


def greedy_reference(model, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence through `model` for every new token.

    Positions follow the attention mask, as `generate` numbers them.
    """

    def next_logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits

    return greedy_without_cache(next_logits, inputs, steps)


# --------------------------------------------------------------------------------------------------
# What trains


@pytest.mark.parametrize("arch,task", CASES)
def test_only_prefix_and_head_train_and_one_step_changes_only_them(arch, task):
    model = injected(arch, task)
    trainable = trainable_names(model)
    expected = {"prefix_encoder.embedding.weight"}
    if task == "sequence-classification":
        expected |= {n for n, _ in model.named_parameters() if ".trained." in n}
        assert any(".trained." in n for n in expected)
    assert trainable == expected
    assert one_step_changes(model, task) == trainable


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch,task", CASES)
def test_counts_equal_hf(arch, task, projection):
    fields = {"prefix_projection": projection, "encoder_hidden_size": 24 if projection else None}
    ours = injected(arch, task, **fields)
    hf = hf_model(arch, task, prefix_projection=projection, encoder_hidden_size=fields["encoder_hidden_size"])
    assert count_parameters(ours) == hf.get_nb_trainable_parameters()


def test_gqa_prefix_has_key_value_heads_width():
    model = injected("llama", "causal-lm")
    config = tiny_config("llama")
    head_dim = config.hidden_size // config.num_attention_heads
    assert (model.num_kv_heads, model.head_dim) == (config.num_key_value_heads, head_dim)
    width = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim
    assert model.prefix_encoder.embedding.weight.shape == (P, width)
    cache = prefix.prefix_cache(model, 3)
    assert cache.layers[0].keys.shape == (3, config.num_key_value_heads, P, head_dim)


def test_projection_is_embedding_tanh_mlp():
    model = injected("gpt2", "causal-lm", prefix_projection=True, encoder_hidden_size=24)
    encoder = model.prefix_encoder
    e = encoder.embedding.weight
    first, second = encoder.transform[0], encoder.transform[2]
    expected = torch.tanh(e @ first.weight.T + first.bias) @ second.weight.T + second.bias
    torch.testing.assert_close(prefix.prefix_table(encoder), expected)
    assert first.weight.shape == (24, 32) and second.weight.shape == (2 * 2 * 32, 24)


# --------------------------------------------------------------------------------------------------
# The same numbers as HF PEFT


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch,task", CASES)
def test_logits_equal_hf_with_the_same_weights(arch, task, projection):
    ours = injected(arch, task, prefix_projection=projection)
    randomise(ours)
    hf = hf_model(arch, task, prefix_projection=projection)
    copy_into_hf(ours, hf)
    got, base = logits(ours), logits(ours.base_model)
    torch.testing.assert_close(got, hf_logits(hf, task, **batch()), atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-3  # the prefix does change the output


@pytest.mark.parametrize("arch", DECODERS)
def test_position_ids_shift_like_hf(arch):
    ours = injected(arch, "causal-lm")
    hf = hf_model(arch, "causal-lm")
    copy_into_hf(ours, hf)
    inputs = batch()
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(logits(ours, inputs), logits(hf, inputs), atol=1e-5, rtol=0)


def test_loss_equals_hf_and_masked_rows_do_not_leak():
    ours = injected("llama", "causal-lm")
    hf = hf_model("llama", "causal-lm")
    copy_into_hf(ours, hf)
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs, labels=labels).loss, hf(**inputs, labels=labels).loss)
        # Left padding: what the masked tokens are must not change the real tokens' logits.
        other = dict(inputs, input_ids=inputs["input_ids"].clone())
        other["input_ids"][0, :3] = 7
        torch.testing.assert_close(ours(**inputs).logits[0, 3:], ours(**other).logits[0, 3:])


# --------------------------------------------------------------------------------------------------
# Save and load: ours, HF's, both ways


def saved(arch: str, task: str, projection: bool, directory: Path) -> VirtualTokenModel:
    """A prefix-tuned model with perturbed weights, its adapter saved to `directory`."""
    ours = injected(arch, task, prefix_projection=projection)
    randomise(ours)
    checkpoint.save_adapter(ours, method(prefix_projection=projection), task, "tiny", directory)
    return ours


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch,task", CASES)
def test_save_load_round_trip(tmp_path, arch, task, projection):
    ours = saved(arch, task, projection, tmp_path)
    loaded, loaded_method = checkpoint.load_adapter(tiny_model(arch, task), tmp_path)
    assert loaded_method.prefix_projection == projection
    assert loaded.prefix_encoder.transform is None  # the saved table, not the MLP that made it
    torch.testing.assert_close(logits(loaded), logits(ours), atol=1e-6, rtol=0)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch,task", CASES)
def test_hf_loads_our_adapter(tmp_path, arch, task, projection):
    ours = saved(arch, task, projection, tmp_path)
    hf = peft.PeftModel.from_pretrained(tiny_model(arch, task), tmp_path)
    torch.testing.assert_close(hf_logits(hf, task, **batch()), logits(ours), atol=1e-5, rtol=0)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch,task", CASES)
def test_we_load_hf_adapter(tmp_path, arch, task, projection):
    hf = hf_model(arch, task, prefix_projection=projection)
    randomise(hf)
    hf.save_pretrained(tmp_path)
    ours, loaded_method = checkpoint.load_adapter(tiny_model(arch, task), tmp_path)
    assert loaded_method.modules_to_save is None  # HF's repeated [classifier, score] is our default
    hf.eval()
    torch.testing.assert_close(logits(ours), hf_logits(hf, task, **batch()), atol=1e-5, rtol=0)


def test_config_fields_are_hf_s(tmp_path):
    ours = injected("llama", "causal-lm", prefix_projection=True)
    hf = hf_model("llama", "causal-lm", prefix_projection=True)
    section = method(prefix_projection=True)
    ours_config, hf_config = saved_configs(ours, section, "causal-lm", hf, tmp_path)
    fields = [*PROMPT_LEARNING_FIELDS, "encoder_hidden_size", "prefix_projection"]
    assert {k: ours_config[k] for k in fields} == {k: hf_config[k] for k in fields}
    assert ours_config["token_dim"] == 32 and ours_config["num_attention_heads"] == 2  # GQA: kv heads


def test_method_from_config_refuses_encoder_decoder_adapters():
    config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "num_transformer_submodules": 2}
    with pytest.raises(UserError, match="num_transformer_submodules"):
        prefix.config_from_adapter(config)


def test_load_copies_in_place_so_an_optimizer_keeps_working():
    model = injected("gpt2", "causal-lm")
    parameter = model.prefix_encoder.embedding.weight
    state = {"prompt_embeddings": torch.full_like(parameter, 0.25)}
    prefix.load_adapter_state(model, state)
    assert model.prefix_encoder.embedding.weight is parameter and bool((parameter == 0.25).all())


def test_load_rejects_missing_keys_and_wrong_shapes():
    model = injected("bert", "sequence-classification")
    state = prefix.adapter_state(model)
    with pytest.raises(AdapterError, match="missing"):
        prefix.load_adapter_state(model, {"prompt_embeddings": state["prompt_embeddings"]})
    with pytest.raises(AdapterError, match="shape"):
        prefix.load_adapter_state(model, {**state, "prompt_embeddings": torch.zeros(P + 1, 128)})
    assert set(state) == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}


# --------------------------------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_generate_equals_greedy_through_hf_forward(arch):
    ours = injected(arch, "causal-lm")
    randomise(ours)
    hf = hf_model(arch, "causal-lm")
    copy_into_hf(ours, hf)
    hf.eval()
    got = ours.generate(**batch(), max_new_tokens=5, do_sample=False)
    assert torch.equal(got, greedy_reference(hf, batch(), 5))


def test_generate_from_inputs_embeds_and_with_beams():
    ours = injected("llama", "causal-lm")
    with torch.no_grad():
        ours.prefix_encoder.embedding.weight.mul_(3)  # a prefix strong enough that losing it shows
    by_ids = check_generate_from_embeds_and_beams(ours)
    # The cache carries the prefix: use_cache=False must not drop or repeat it.
    assert torch.equal(ours.generate(**batch(), max_new_tokens=4, do_sample=False, use_cache=False), by_ids)


def test_generate_refuses_a_cache_and_gradient_checkpointing_is_refused():
    ours = injected("gpt2", "causal-lm")
    with pytest.raises(UserError, match="cache"):
        ours.generate(**batch(), cache=prefix.prefix_cache(ours, 2), max_new_tokens=1)
    with pytest.raises(UserError, match="gradient checkpointing"):
        ours.gradient_checkpointing_enable()
    base = tiny_model("gpt2")
    base.gradient_checkpointing_enable()
    with pytest.raises(UserError, match="gradient checkpointing"):
        prefix.inject(base, method(), Context("causal-lm"))


# --------------------------------------------------------------------------------------------------
# Odds and ends


def test_meta_device_and_dtype():
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("llama"))
    wrapped = prefix.inject(meta, method(prefix_projection=True), Context("causal-lm"))
    assert wrapped.prefix_encoder.embedding.weight.is_meta
    assert count_parameters(wrapped) == count_parameters(
        injected("llama", "causal-lm", prefix_projection=True)
    )
    bf16 = prefix.inject(tiny_model("opt").to(torch.bfloat16), method(), Context("causal-lm"))
    assert bf16.prefix_encoder.embedding.weight.dtype == torch.bfloat16
    assert bf16(**batch()).logits.dtype == torch.bfloat16


def test_wrapper_passes_through_what_a_loop_needs():
    ours = injected("llama", "causal-lm")
    assert ours.config is ours.base_model.config
    assert ours.generation_config is ours.base_model.generation_config
    assert ours.get_input_embeddings() is ours.base_model.get_input_embeddings()
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float32


def test_registry_and_not_mergeable():
    assert by_peft_type("PREFIX_TUNING") is prefix
    assert prefix.MERGEABLE is False and "peft generate" in prefix.WHY_NOT_MERGEABLE
