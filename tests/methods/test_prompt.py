"""Prompt tuning against HF PEFT (the reference) on tiny models of every architecture.

HF PEFT 0.21.2's ``generate`` for prompt tuning does not work with transformers 5.24 (it looks for the cache
under ``past_key_values``, now ``cache``, so it re-prepends the prompt at every step; OPT crashes): the
reference for ``generate`` is greedy decoding through the base model on [HF's prompt; embed(input_ids)].
"""

from __future__ import annotations

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
    labels_for,
    logits,
    one_step_changes,
    positions_from_mask,
    randomise,
    saved_configs,
    task_of,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
    trainable_names,
)
from torch import nn
from transformers import AutoModelForCausalLM

from peftcli.errors import UserError
from peftcli.methods import Context, MethodConfig, by_peft_type, make_config, prompt
from peftcli.methods.modules import AdapterError, count_parameters
from peftcli.methods.virtual import VirtualTokenModel
from peftcli.runs import adapter as checkpoint

P = 4  # virtual tokens
# Every architecture with its default task, and a decoder as a classifier.
CASES = [(arch, task_of(arch)) for arch in ARCHS] + [("llama", "sequence-classification")]
HF_INIT = {"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}
TEXT = "Classify:"


def method(**fields) -> MethodConfig:
    return make_config("prompt-tuning", num_virtual_tokens=P, **fields)


def injected(arch: str, task: str, seed: int = 0, **fields) -> VirtualTokenModel:
    return prompt.inject(tiny_model(arch, task, seed=seed), method(**fields), Context(task))


def hf_model(arch: str, task: str, **fields) -> peft.PeftModel:
    config = peft.PromptTuningConfig(task_type=HF_TASK[task], num_virtual_tokens=P, **fields)
    return peft.get_peft_model(tiny_model(arch, task), config)


def copy_into_hf(ours: VirtualTokenModel, hf: peft.PeftModel) -> None:
    """Give HF PEFT's model our prompt's and heads' weights."""
    hf.prompt_encoder["default"].embedding.weight.data.copy_(ours.prompt.weight)
    copy_heads_into_hf(ours.base_model, hf)


def greedy_reference(base: nn.Module, prompt_weight: torch.Tensor, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding through the base model on [prompt; embed(ids)], positions from the mask as generate."""

    def next_logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        embeds = base.get_input_embeddings()(ids)
        embeds = torch.cat([prompt_weight.expand(ids.shape[0], -1, -1), embeds], dim=1)
        full_mask = torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], dim=1)
        position_ids = positions_from_mask(full_mask)
        return base(inputs_embeds=embeds, attention_mask=full_mask, position_ids=position_ids).logits

    return greedy_without_cache(next_logits, inputs, steps)


# --------------------------------------------------------------------------------------------------
# What trains


@pytest.mark.parametrize("arch,task", CASES)
def test_only_prompt_and_head_train_and_one_step_changes_only_them(arch, task):
    model = injected(arch, task)
    trainable = trainable_names(model)
    expected = {"prompt.weight"} | {n for n, _ in model.named_parameters() if ".trained." in n}
    assert trainable == expected and (task == "causal-lm") == (expected == {"prompt.weight"})
    assert one_step_changes(model, task) == trainable


@pytest.mark.parametrize("arch,task", CASES)
def test_counts_equal_hf(arch, task):
    assert count_parameters(injected(arch, task)) == hf_model(arch, task).get_nb_trainable_parameters()


# --------------------------------------------------------------------------------------------------
# The same numbers as HF PEFT


@pytest.mark.parametrize("arch,task", CASES)
def test_logits_and_loss_equal_hf_with_the_same_weights(arch, task):
    ours = injected(arch, task)
    randomise(ours)
    hf = hf_model(arch, task)
    copy_into_hf(ours, hf)
    inputs = batch()
    with torch.no_grad():
        got = ours(**inputs, labels=labels_for(task, inputs))
        expected = hf(**inputs, labels=labels_for(task, inputs))
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)
    if task == "causal-lm":
        assert got.logits.shape[1] == P + batch()["input_ids"].shape[1]  # outputs carry the prompt positions


def test_causal_labels_extended_with_ignore_index():
    ours = injected("llama", "causal-lm")
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = ours(**inputs, labels=labels)
    # No loss on the prompt; the last prompt position predicts the first real token.
    predicting = out.logits[:, P - 1 : -1].reshape(-1, out.logits.shape[-1])
    expected = nn.functional.cross_entropy(predicting, labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_token_type_ids_and_left_padding():
    ours = injected("bert", "sequence-classification")
    randomise(ours)
    inputs = batch()
    with torch.no_grad():
        plain = ours(**inputs).logits
        typed = ours(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"])).logits
        torch.testing.assert_close(plain, typed)  # zeros, prompt included, are bert's default
        other = dict(inputs, input_ids=inputs["input_ids"].clone())
        other["input_ids"][0, :3] = 7  # masked positions of the left-padded row
        torch.testing.assert_close(ours(**other).logits, plain)


# --------------------------------------------------------------------------------------------------
# Initialisation


def test_text_init_matches_hf(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    ours = prompt.inject(
        tiny_model("llama"),
        method(prompt_init="text", prompt_init_text="Hi"),
        Context("causal-lm", tokenizer),
    )
    hf = hf_model(
        "llama",
        "causal-lm",
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="Hi",
        tokenizer_name_or_path=str(tmp_path),
    )
    torch.testing.assert_close(ours.prompt.weight, hf.prompt_encoder["default"].embedding.weight)
    # "Hi" is two byte tokens, repeated to fill four virtual tokens.
    ids = tokenizer("Hi")["input_ids"] * 2
    torch.testing.assert_close(ours.prompt.weight, ours.get_input_embeddings().weight[ids])


def test_text_init_cuts_long_text():
    tokenizer = tiny_tokenizer()
    ours = prompt.inject(
        tiny_model("gpt2"),
        method(prompt_init="text", prompt_init_text="abcdefgh"),
        Context("causal-lm", tokenizer),
    )
    ids = tokenizer("abcd")["input_ids"]
    torch.testing.assert_close(ours.prompt.weight, ours.get_input_embeddings().weight[ids])


@pytest.mark.parametrize("init", ["random", "vocab"])
def test_random_and_vocab_init_match_hf_for_the_same_seed(init):
    ours_base, hf_base = tiny_model("opt"), tiny_model("opt")
    torch.manual_seed(11)
    ours = prompt.inject(ours_base, method(prompt_init=init), Context("causal-lm"))
    torch.manual_seed(11)
    config = peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prompt_tuning_init=HF_INIT[init]
    )
    hf = peft.get_peft_model(hf_base, config)
    torch.testing.assert_close(ours.prompt.weight, hf.prompt_encoder["default"].embedding.weight)
    vocab = ours.get_input_embeddings().weight
    is_vocab_row = [(row == vocab).all(-1).any().item() for row in ours.prompt.weight]
    assert all(is_vocab_row) == (init == "vocab")


def test_text_init_without_tokenizer_is_an_error_until_loaded():
    ours = prompt.inject(
        tiny_model("llama"), method(prompt_init="text", prompt_init_text="Hi"), Context("causal-lm")
    )
    with pytest.raises(UserError, match="prompt_init"):
        ours(**batch())
    with pytest.raises(UserError, match="prompt_init"):
        prompt.adapter_state(ours)
    prompt.load_adapter_state(ours, {"prompt_embeddings": torch.ones(P, 64)})
    assert ours(**batch()).logits.shape[1] == P + 12


def test_text_init_finds_the_tokenizer_saved_with_the_model(tmp_path):
    from tiny import save_tiny

    save_tiny(tmp_path, "llama")
    base = AutoModelForCausalLM.from_pretrained(tmp_path)
    ours = prompt.inject(base, method(prompt_init="text", prompt_init_text="Hi"), Context("causal-lm"))
    ids = tiny_tokenizer()("Hi")["input_ids"] * 2
    torch.testing.assert_close(ours.prompt.weight, base.get_input_embeddings().weight[ids])
    config = prompt.adapter_config(ours, method(prompt_init="text", prompt_init_text="Hi"), "causal-lm")
    assert config["tokenizer_name_or_path"] == str(tmp_path)


# --------------------------------------------------------------------------------------------------
# Save and load: ours, HF's, both ways


@pytest.mark.parametrize("arch,task", CASES)
def test_save_load_round_trip(tmp_path, arch, task):
    ours = injected(arch, task)
    randomise(ours)
    checkpoint.save_adapter(ours, method(), task, "tiny", tmp_path)
    loaded, _ = checkpoint.load_adapter(tiny_model(arch, task), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(ours), atol=0, rtol=0)


@pytest.mark.parametrize("arch,task", CASES)
def test_hf_loads_our_adapter(tmp_path, arch, task):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    tokenizer.name_or_path = str(tmp_path / "tokenizer")
    fields = {"prompt_init": "text", "prompt_init_text": TEXT}
    ours = prompt.inject(tiny_model(arch, task), method(**fields), Context(task, tokenizer))
    randomise(ours)
    checkpoint.save_adapter(ours, method(**fields), task, "tiny", tmp_path / "adapter")
    hf = peft.PeftModel.from_pretrained(tiny_model(arch, task), tmp_path / "adapter")
    assert hf.peft_config["default"].prompt_tuning_init == "TEXT"
    torch.testing.assert_close(logits(hf), logits(ours), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,task", CASES)
def test_we_load_hf_adapter(tmp_path, arch, task):
    hf = hf_model(arch, task, prompt_tuning_init="SAMPLE_VOCAB")
    randomise(hf)
    hf.save_pretrained(tmp_path)
    ours, loaded_method = checkpoint.load_adapter(tiny_model(arch, task), tmp_path)
    assert loaded_method.prompt_init == "vocab" and loaded_method.modules_to_save is None
    hf.eval()
    torch.testing.assert_close(logits(ours), logits(hf), atol=1e-5, rtol=0)


def test_config_fields_are_hf_s(tmp_path):
    ours = injected("llama", "sequence-classification")
    hf = hf_model("llama", "sequence-classification")
    ours_config, hf_config = saved_configs(ours, method(), "sequence-classification", hf, tmp_path)
    fields = [
        *PROMPT_LEARNING_FIELDS,
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
    ]
    assert {k: ours_config[k] for k in fields} == {k: hf_config[k] for k in fields}
    assert prompt.config_from_adapter(ours_config) == method()


def test_method_from_config_errors():
    base = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}
    with pytest.raises(UserError, match="num_transformer_submodules"):
        prompt.config_from_adapter({**base, "num_transformer_submodules": 2})
    with pytest.raises(UserError, match="prompt_tuning_init"):
        prompt.config_from_adapter({**base, "prompt_tuning_init": "WORDS"})
    with pytest.raises(UserError, match="prompt_tuning_init_text"):
        prompt.config_from_adapter({**base, "prompt_tuning_init": "TEXT"})


def test_load_rejects_missing_keys_and_wrong_shapes():
    model = injected("roberta", "sequence-classification")
    state = prompt.adapter_state(model)
    assert {k for k in state if k != "prompt_embeddings"} == {
        "base_model.classifier.dense.weight",
        "base_model.classifier.dense.bias",
        "base_model.classifier.out_proj.weight",
        "base_model.classifier.out_proj.bias",
    }
    with pytest.raises(AdapterError, match="missing"):
        prompt.load_adapter_state(model, {"prompt_embeddings": state["prompt_embeddings"]})
    with pytest.raises(AdapterError, match="shape"):
        prompt.load_adapter_state(model, {**state, "prompt_embeddings": torch.zeros(P, 33)})


# --------------------------------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_generate_equals_greedy_reference(arch):
    hf = hf_model(arch, "causal-lm")
    randomise(hf)
    ours = injected(arch, "causal-lm")
    prompt.load_adapter_state(ours, {"prompt_embeddings": hf.prompt_encoder["default"].embedding.weight})
    got = ours.generate(**batch(), max_new_tokens=5, do_sample=False)
    expected = greedy_reference(ours.base_model, hf.prompt_encoder["default"].embedding.weight, batch(), 5)
    assert torch.equal(got, expected)
    # Unpadded rows: the same as greedy through HF PEFT's forward (which numbers positions 0..n-1).
    first = logits(hf)[1, -1].argmax()
    assert got[1, batch()["input_ids"].shape[1]] == first


def test_generate_from_inputs_embeds_and_with_beams():
    ours = injected("gpt2", "causal-lm")
    randomise(ours)
    check_generate_from_embeds_and_beams(ours)


# --------------------------------------------------------------------------------------------------
# Odds and ends


def test_meta_device_and_dtype():
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("llama"))
    wrapped = prompt.inject(meta, method(prompt_init="text", prompt_init_text="Hi"), Context("causal-lm"))
    assert wrapped.prompt.weight.is_meta and wrapped.missing_init is None
    assert count_parameters(wrapped) == count_parameters(injected("llama", "causal-lm"))
    bf16 = prompt.inject(
        tiny_model("opt").to(torch.bfloat16), method(prompt_init="vocab"), Context("causal-lm")
    )
    assert bf16.prompt.weight.dtype == torch.bfloat16
    assert bf16(**batch()).logits.dtype == torch.bfloat16


def test_gradient_checkpointing_still_trains_the_prompt():
    ours = injected("llama", "causal-lm")
    ours.gradient_checkpointing_enable()
    ours.train()
    ours(**batch(), labels=batch()["input_ids"]).loss.backward()
    assert ours.prompt.weight.grad is not None and ours.prompt.weight.grad.abs().sum() > 0


def test_registry_and_not_mergeable():
    assert by_peft_type("PROMPT_TUNING") is prompt
    assert prompt.MERGEABLE is False and "peft generate" in prompt.WHY_NOT_MERGEABLE
