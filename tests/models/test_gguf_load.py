"""gguf_load: a llama GGUF's config from its header, and (filled.py reading its tensors through gguf_load,
nothing kept packed) the model transformers' own GGUF loader makes, tensor for tensor; its torch
dequantizers give the gguf package's numpy results bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from tiny import save_gguf_base
from transformers import AutoConfig, AutoModelForCausalLM

from peftcli.models import gguf_load
from peftcli.models.gguf_header import GGUFCutShort, TensorInfo
from peftcli.models.load import load_config, load_model
from peftcli.models.sources import resolve


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantizers_match_the_gguf_package_bit_for_bit(kind):
    qtype = GGMLQuantizationType[kind]
    values = np.random.default_rng(0).normal(0, 2, (8, 64)).astype(np.float32)
    if kind == "F32":
        raw = values.view(np.uint8)
    elif kind == "F16":
        raw = values.astype(np.float16).view(np.uint8)
    else:
        raw = gguf_quantize(values, qtype)
    blob = np.ascontiguousarray(raw).reshape(-1)
    info = TensorInfo("t", (8, 64), int(qtype), 0, blob.nbytes)
    ours = gguf_load.dequantize(blob, info)
    reference = values if kind == "F32" else gguf_dequantize(np.ascontiguousarray(raw), qtype)
    reference = reference.astype(np.float32) if kind != "F16" else raw.view(np.float16).astype(np.float32)
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(reference)).reshape(8, 64))


@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_1"])
@pytest.mark.parametrize("tied", [False, True])
def test_a_llama_gguf_loads_as_transformers_loads_it(tmp_path, quant, tied):
    path = str(save_gguf_base(tmp_path / "m.gguf", "llama", quant, tie_word_embeddings=tied))
    source = resolve(path)
    gguf = gguf_load.fast_gguf(path)
    assert gguf is not None
    ours = load_model(source, dtype="float32", quantize="none")  # every tensor dequantized
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    a, b = ours.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    ids = torch.tensor([[5, 60, 7, 99, 250]])
    assert torch.equal(ours(ids).logits, reference(ids).logits)
    expected = AutoConfig.from_pretrained(str(tmp_path), gguf_file="m.gguf").to_dict()
    got = load_config(source).to_dict()
    for key in ("_name_or_path", "dtype", "quantization_config"):
        expected.pop(key, None), got.pop(key, None)
    assert got == expected
    assert ours.generation_config.to_dict() == reference.generation_config.to_dict()


def test_the_config_key_table_is_transformers_own():
    """gguf_load.CONFIG_KEYS is written out (reading a config imports no transformers): it must stay the
    general, llama and tokenizer entries of transformers' GGUF table that name a field."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    theirs = {
        f"{prefix}.{key}": field
        for prefix in ("general", "llama", "tokenizer")
        for key, field in GGUF_CONFIG_MAPPING[prefix].items()
        if field not in (None, -1)
    }
    assert gguf_load.CONFIG_KEYS == theirs


def test_what_transformers_reads_otherwise_is_left_to_it(tmp_path):
    """A GPT-2 GGUF goes to transformers' loader; a file cut short is said to be (no reader can load it,
    and transformers' error would not say why)."""
    path = str(save_gguf_base(tmp_path / "gpt2.gguf", "gpt2"))
    assert gguf_load.fast_gguf(path) is None
    (tmp_path / "not.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(GGUFCutShort, match="cut short: the file ends at byte 6"):
        gguf_load.fast_gguf(str(tmp_path / "not.gguf"))


@pytest.mark.slow
def test_the_packaged_smollm2_loads_as_transformers_loads_it():
    source = resolve("smollm2-135m-instruct")
    ours = load_model(source, dtype="float32", quantize="none")
    reference = AutoModelForCausalLM.from_pretrained(
        source.path, gguf_file=source.gguf_file, dtype=torch.float32
    )
    a, b = ours.state_dict(), reference.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
