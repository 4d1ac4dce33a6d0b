"""models/filled.py through load.py's load_model: bases filled tensor by tensor, quantized on arrival.

Oracles: transformers' own loading (the model loaded whole, then quantized the same way; for GGUF files,
transformers' fp32 dequantization) and the original model an F32 GGUF file was written from.
"""

from __future__ import annotations

import logging

import pytest
import torch
from tiny import logits, save_tiny, tiny_config, tiny_model, write_llama_gguf
from transformers import AutoModelForCausalLM

from peftcli.errors import UserError
from peftcli.models import filled
from peftcli.models.gguf_header import read_gguf
from peftcli.models.load import load_model
from peftcli.models.sources import resolve
from peftcli.quant import convert
from peftcli.quant.blocks import BlockEmbedding, BlockLinear
from peftcli.quant.nf4 import NF4Linear

FORMATS = {"int8": BlockLinear, "int4": BlockLinear, "nf4": NF4Linear}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("llama"), "llama"))


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """A tiny tied Llama as GGUF files: F32, and Q4_1 linears with a Q8_0 embedding (SmolLM2's mix)."""
    root = tmp_path_factory.mktemp("gguf")
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    write_llama_gguf(root / "f32.gguf", model)
    write_llama_gguf(root / "q41.gguf", model, {"linear": "Q4_1", "embedding": "Q8_0"})
    write_llama_gguf(root / "q40.gguf", model, {"linear": "Q4_0", "embedding": "Q8_0"})
    return root, model


@pytest.mark.parametrize("kind", list(FORMATS))
def test_filled_equals_loading_whole_then_quantizing(llama_dir, kind):
    ours = load_model(resolve(llama_dir), dtype="float32", quantize=kind)
    whole = tiny_model("llama", "causal-lm")
    convert.quantize_model(whole, kind, torch.float32)
    assert torch.equal(logits(ours), logits(whole))
    layers = [m for m in ours.modules() if convert.is_quantized(m)]
    assert len(layers) == 14 and all(type(m) is FORMATS[kind] for m in layers)  # 7 per layer
    assert type(ours.lm_head) is torch.nn.Linear  # the head stays at model.dtype (QLoRA's choice)
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])


def test_quantized_logits_stay_near_the_float_model(llama_dir):
    """Rounding noise, not a fault. A Gaussian block of 32 spans ~4 sigma: int4's step is ~0.28 sigma, its
    rounding error ~8% of a weight's rms (step / sqrt(12)), NF4's about the same, int8's ~0.5%. On this
    random tiny model (all its weights noise, so nothing averages out) that moves the logits by ~10% (4-bit)
    and < 1% (int8) of their scale; the bounds leave 2x room and still catch any misplaced weight (~100%)."""
    reference = logits(tiny_model("llama", "causal-lm"))
    scale = float(reference.abs().max())
    for kind, bound in (("int8", 0.02), ("int4", 0.25), ("nf4", 0.25)):
        quantized = logits(load_model(resolve(llama_dir), dtype="float32", quantize=kind))
        assert (quantized - reference).abs().max() / scale < bound, kind


def test_sharded_checkpoint_and_bf16_compute(tmp_path):
    model = tiny_model("llama", "causal-lm")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = load_model(resolve(str(tmp_path)), dtype="bfloat16", quantize="int4")
    whole = tiny_model("llama", "causal-lm")
    convert.quantize_model(whole, "int4", torch.bfloat16)  # from the fp32 weights, as the file holds them
    quantized = [(n, m) for n, m in whole.named_modules() if convert.is_quantized(m)]
    for name, module in quantized:
        assert torch.equal(ours.get_submodule(name).dequantize(), module.dequantize()), name
    assert ours.model.norm.weight.dtype == torch.bfloat16 and ours.config.dtype == torch.bfloat16
    assert logits(ours).dtype == torch.bfloat16


def test_a_classifier_gets_a_fresh_head_of_the_recipes_size(llama_dir):
    model = load_model(
        resolve(llama_dir),
        "sequence-classification",
        dtype="float32",
        quantize="int8",
        label_names=["a", "b", "c", "d", "e"],
    )
    assert model.score.weight.shape == (5, 64) and not model.score.weight.is_meta
    assert model.score.weight.std() > 0 and type(model.score) is torch.nn.Linear
    assert logits(model).shape == (2, 5)


def test_a_checkpoint_that_cannot_be_placed_loads_whole(tmp_path, caplog):
    """A tensor renamed in the file: the filler refuses it, transformers loads the model (its missing tensor
    freshly initialised, as transformers does) and the layers are quantized after: said in a note."""
    model = tiny_model("llama", "causal-lm")
    state = {k.replace("model.norm.", "model.final_norm."): v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(filled.CannotFill, match="model.norm.weight"):
        filled.load_filled(
            AutoModelForCausalLM, model.config, resolve(str(tmp_path)), torch.float32, "int4", "causal-lm"
        )
    with caplog.at_level(logging.INFO, logger="peftcli"):
        loaded = load_model(resolve(str(tmp_path)), dtype="float32", quantize="int4")
    assert "whole, then quantizing" in caplog.text
    assert type(loaded.model.layers[0].mlp.up_proj) is BlockLinear


@pytest.mark.parametrize("quantize", ["auto", "none"])
def test_gguf_names_and_query_key_rows(gguf_files, quantize):
    """An F32 GGUF file gives back the model it was written from, exactly: every name mapped, the query and
    key rows un-permuted."""
    root, model = gguf_files
    ours = load_model(resolve(str(root / "f32.gguf")), dtype="float32", quantize=quantize)
    assert torch.equal(logits(ours), logits(model))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize(("name", "linear_type"), [("q41.gguf", "Q4_1"), ("q40.gguf", "Q4_0")])
def test_gguf_blocks_stay_packed_and_compute_as_transformers_load(gguf_files, name, linear_type):
    root, _ = gguf_files
    packed = load_model(resolve(str(root / name)), dtype="float32")  # quantize: auto keeps the blocks
    reference = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=name, dtype=torch.float32).eval()
    assert torch.equal(logits(packed), logits(reference))
    q_proj = packed.model.layers[0].self_attn.q_proj
    assert type(q_proj) is BlockLinear and q_proj.format == linear_type
    assert (
        isinstance(packed.model.embed_tokens, BlockEmbedding) and packed.model.embed_tokens.format == "Q8_0"
    )
    # the tied head reads the embedding's blocks: one copy of them
    assert packed.lm_head.blocks is packed.model.embed_tokens.blocks
    assert convert.describe(packed)["Q8_0"] == 2
    # resident: the file's tensor bytes (norms included, at fp32 as stored), plus the rotary buffer
    tensor_bytes = sum(e.nbytes for e in read_gguf(str(root / name)).tensors)
    assert tensor_bytes < convert.frozen_bytes(packed) <= 1.01 * tensor_bytes


def test_gguf_requantized_to_nf4_and_dense_bf16(gguf_files):
    root, _ = gguf_files
    reference = logits(load_model(resolve(str(root / "q41.gguf")), dtype="float32", quantize="none"))
    as_nf4 = load_model(resolve(str(root / "q41.gguf")), dtype="float32", quantize="nf4")
    assert type(as_nf4.model.layers[1].mlp.down_proj) is NF4Linear
    assert (logits(as_nf4) - reference).abs().max() < 0.25 * reference.abs().max()  # as above
    dense = load_model(resolve(str(root / "q41.gguf")), dtype="bfloat16", quantize="none")
    assert dense.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert (logits(dense).float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_layers_a_format_cannot_hold_are_named(tmp_path, caplog):
    """GPT-2's Conv1D layers stay as they are under int4: said once, with an example."""
    save_tiny(tmp_path, "gpt2")
    with caplog.at_level(logging.INFO, logger="peftcli"):
        model = load_model(resolve(str(tmp_path)), dtype="float32", quantize="int4")
    assert not any(convert.is_quantized(m) for m in model.modules())
    assert "int4 leaves 8 linear layers unquantized (e.g. `transformer.h.0.attn.c_attn`)" in caplog.text


@pytest.mark.parametrize("kind", ["int4", "nf4"])
def test_a_weight_a_format_cannot_hold_is_a_clear_error(tmp_path, kind):
    model = tiny_model("llama", "causal-lm")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path)
    where = "`model.layers.1.mlp.up_proj.weight`"
    with pytest.raises(UserError, match=rf"{kind} cannot hold {where}: .*not finite"):
        load_model(resolve(str(tmp_path)), quantize=kind)
