"""llama.py's Decoder against transformers' LlamaForCausalLM: the same logits (full and step by step with
the cache), the same greedy and seeded sampled tokens through `peft generate`'s path, on safetensors and
GGUF bases; anything its math does not cover goes to transformers. (That the first token imports no
transformers at all: test_tokenizer.py.)"""

from __future__ import annotations

import pytest
import torch
from tiny import save_bpe_base, save_gguf_base, save_lora_run
from transformers import AutoModelForCausalLM

from peftcli.infer import llama, load_for_inference
from peftcli.infer import load as infer_load
from peftcli.infer.generate import continue_ids
from peftcli.infer.prompt import encode_prompt, stop_ids
from peftcli.models.sources import resolve


@pytest.mark.parametrize(
    "config",
    [
        {},  # 4 query heads on 2 key/value heads, untied head
        {"tie_word_embeddings": True, "num_key_value_heads": 4, "rope_theta": 500.0, "rms_norm_eps": 1e-5},
        {"head_dim": 8},  # heads narrower than hidden / heads
    ],
    ids=["gqa", "tied-mha-theta", "head-dim"],
)
def test_logits_equal_transformers(tmp_path, config):
    base = save_bpe_base(tmp_path / "base", "llama", **config)
    reference = AutoModelForCausalLM.from_pretrained(base).eval()
    decoder = llama.load(resolve(str(base)), torch.float32)
    assert isinstance(decoder, llama.Decoder)
    ids = torch.randint(0, reference.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.allclose(decoder(ids), expected, atol=1e-5, rtol=0)
        # one position at a time through the cache: each step's logits are the full pass's at that position
        # (to float32 rounding: logits of size ~5 from products of other shapes)
        caches, rotary = decoder.new_caches(2, 11), decoder.rotary(11)
        steps = [decoder.logits(ids[:, :4], caches, 0, rotary)]
        steps += [decoder.logits(ids[:, i : i + 1], caches, i, rotary) for i in range(4, 11)]
    assert torch.allclose(torch.stack(steps, 1), expected[:, 3:], atol=1e-4, rtol=0)


def _transformers_path(monkeypatch):
    monkeypatch.setattr(infer_load, "plain_decoder", lambda adapter: (None, False))


@pytest.mark.parametrize("kind", ["safetensors", "gguf-q8_0", "tied-head-lora"])
def test_generate_picks_transformers_tokens(tmp_path, monkeypatch, kind):
    """Greedy, and sampled with a seed (temperature, top-k 50 and top-p as transformers' generate applies
    them), the decoder's tokens are transformers' on the same run: folded, or (a LoRA on a head tied
    to the embedding cannot fold) through the LoRA layers."""
    lora_fields = {}
    if kind == "gguf-q8_0":
        base = save_gguf_base(tmp_path / "base.gguf", "llama", "q8_0")
    elif kind == "safetensors":
        base = save_bpe_base(tmp_path / "base", "llama")
    else:
        base = save_bpe_base(tmp_path / "base", "llama", tie_word_embeddings=True)
        lora_fields = {"target_modules": ["lm_head", "q_proj", "down_proj"]}
    run = save_lora_run(tmp_path / "run", base, **lora_fields)
    fast, tokenizer, info = load_for_inference(run, fold=True)
    folded = kind != "tied-head-lora"
    assert isinstance(fast, llama.Decoder) and info.folded == folded
    with monkeypatch.context() as patch:
        _transformers_path(patch)
        slow, _, slow_info = load_for_inference(run, fold=True)
    assert not isinstance(slow, llama.Decoder) and slow_info.folded == folded
    ids, _ = encode_prompt(tokenizer, "hello world", "chat")
    stop = stop_ids(tokenizer, "chat")
    assert continue_ids(fast, tokenizer, ids, 24, []) == continue_ids(slow, tokenizer, ids, 24, [])
    for seed in range(3):
        sampling = {"temperature": 0.9, "top_p": 0.8, "seed": seed}
        sampled = continue_ids(fast, tokenizer, ids, 16, stop, sampling)
        assert sampled == continue_ids(slow, tokenizer, ids, 16, stop, sampling)


def test_what_its_math_does_not_cover_is_decoded_by_transformers(tmp_path):
    covered = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip
    assert llama.spec_of(covered).head_dim == 4 and llama.spec_of(covered).num_key_value_heads == 2
    for change in (
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
        {"attention_bias": True},
        {"mlp_bias": True},
        {"hidden_act": "gelu"},
        {"model_type": "mistral"},
        {"hidden_size": None},
    ):
        assert llama.spec_of({**covered, **change}) is None, change
    base = save_bpe_base(tmp_path / "base", "llama", attention_bias=True)
    run = save_lora_run(tmp_path / "run", base)
    model, tokenizer, info = load_for_inference(run, fold=True)
    assert not isinstance(model, llama.Decoder) and info.folded
    ids, _ = encode_prompt(tokenizer, "hello", "raw")
    assert len(continue_ids(model, tokenizer, ids, 4, [])) == 4


def test_a_generation_config_that_changes_decoding_keeps_transformers_path(tmp_path):
    """transformers' generate applies a model dir's repetition penalty even when greedy: left to it."""
    import json

    base = save_bpe_base(tmp_path / "base", "llama")
    run = save_lora_run(tmp_path / "run", base)
    settings = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**settings, "top_k": 50, "temperature": 0.6}))
    assert isinstance(load_for_inference(run, fold=True)[0], llama.Decoder)
    (base / "generation_config.json").write_text(json.dumps({**settings, "repetition_penalty": 1.3}))
    model, tokenizer, _ = load_for_inference(run, fold=True)
    assert not isinstance(model, llama.Decoder)


def test_a_run_on_a_quantized_base_keeps_transformers_path(tmp_path):
    """int8/int4/nf4 runs trained on rounded weights: the decoder (full-precision weights) does not apply."""
    run = save_lora_run(tmp_path / "run", save_bpe_base(tmp_path / "base", "llama"))
    recipe = (run / "recipe.yaml").read_text()
    (run / "recipe.yaml").write_text(recipe.replace("task: causal-lm", "task: causal-lm\n  quantize: int8"))
    model, _, _ = load_for_inference(run, fold=True)
    assert not isinstance(model, llama.Decoder)
