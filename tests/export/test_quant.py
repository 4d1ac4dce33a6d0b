"""The tensor types of an export: which tensor gets which, and that a quantized file holds exactly the gguf
package's quantization of the merged weights (read back through the GGUF loader, itself pinned to
transformers' reader)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from tiny import save_bpe_base, save_lora_run

from peftcli.export import run as export
from peftcli.export.quant import F16, F32, QUANTS, choose_type
from peftcli.infer import load_for_inference
from peftcli.models.gguf_header import read_gguf
from peftcli.models.gguf_names import from_llamacpp_rotary, to_llamacpp_rotary
from peftcli.models.load import load_model
from peftcli.models.sources import resolve

Q8_0, Q4_0, Q4_1, Q4_K = QUANTS["q8_0"], QUANTS["q4_0"], QUANTS["q4_1"], 12


def test_which_tensor_gets_which_type():
    assert choose_type((64,), Q8_0, None, changed=False) == F32  # vectors (norms, biases) stay f32
    assert choose_type((64, 64), Q4_1, None, changed=False) == Q4_1
    assert choose_type((64, 48), Q8_0, None, changed=False) == F16  # rows not whole blocks of 32
    assert choose_type((64, 64), None, None, changed=True) == F16  # no GGUF base: f16
    # a GGUF base's own types: kept where unchanged; a changed tensor of a 4-bit type becomes q8_0 (4 bits
    # would round the adapter's change away), one of an 8-bit or float type keeps it
    assert choose_type((64, 64), None, Q4_1, changed=False) == Q4_1
    assert choose_type((64, 64), None, Q4_1, changed=True) == Q8_0
    assert choose_type((64, 64), None, Q4_K, changed=False) == Q4_K
    assert choose_type((64, 64), None, Q4_K, changed=True) == Q8_0
    assert choose_type((64, 64), None, Q8_0, changed=True) == Q8_0
    assert choose_type((64, 64), None, F16, changed=True) == F16


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1", "bf16"])
def test_a_quantized_file_holds_the_quantized_merged_weights(tmp_path, quant):
    base = save_bpe_base(tmp_path / "base", "llama")
    run = save_lora_run(tmp_path / "run", base)
    out = tmp_path / f"{quant}.gguf"
    export.export_run(run, out, quant=quant, verify=False)
    merged, _, info = load_for_inference(run, fold=True)
    assert info.folded
    loaded = dict(load_model(resolve(str(out)), dtype="float32", quantize="none").named_parameters())
    qtype = GGMLQuantizationType[quant.upper()]
    config = merged.config
    for name, param in merged.named_parameters():
        weight = param.detach().numpy()
        if weight.ndim == 1:
            assert torch.equal(loaded[name], param), name
            continue
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(
            name.split(".")[-2]
        )
        stored = to_llamacpp_rotary(weight, heads) if heads else weight
        expected = dequantize(quantize(np.ascontiguousarray(stored), qtype), qtype)
        expected = from_llamacpp_rotary(expected, heads) if heads else expected
        assert torch.equal(loaded[name], torch.from_numpy(np.ascontiguousarray(expected))), name
    gguf = read_gguf(str(out))
    assert gguf.metadata["general.file_type"] == {"q8_0": 7, "q4_0": 2, "q4_1": 3, "bf16": 32}[quant]
    assert gguf.metadata["general.quantization_version"] == 2
