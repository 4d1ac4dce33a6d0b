"""Adapters trained on quantized bases load in HF PEFT (0.21.2) and compute what peftcli computes.

- nf4: HF PEFT on transformers' own bitsandbytes 4-bit base (BitsAndBytesConfig, nf4) — the same codes
  (tests/quant/test_nf4.py), so the same model;
- int8 / int4 (no transformers equivalent): HF PEFT on a plain base holding the weights the adapter trained
  against, dequantized;
- a GGUF file's packed blocks: HF PEFT on transformers' own (fp32) load of the same file.
HF PEFT's forward is the reference: logits agree to float32 rounding.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from tiny import logits, randomise, save_tiny, tiny_config, write_llama_gguf
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peftcli.methods import Context, lora, make_config
from peftcli.models.load import load_model
from peftcli.models.sources import resolve
from peftcli.quant import convert
from peftcli.runs import adapter as checkpoint

SECTION = make_config("lora", rank=4, alpha=8.0, target_modules="all-linear")


def ours_and_saved(base: str, quantize: str, directory) -> torch.nn.Module:
    model = lora.inject(load_model(resolve(base), quantize=quantize), SECTION, Context("causal-lm"))
    randomise(model, scale=0.05)
    checkpoint.save_adapter(model, SECTION, "causal-lm", base, directory)
    return model.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("llama"), "llama"))


def test_an_nf4_adapter_loads_on_transformers_bitsandbytes_base(tmp_path, llama):
    ours = ours_and_saved(llama, "nf4", tmp_path / "adapter")
    settings = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(llama, quantization_config=settings, device_map="cpu")
    assert type(base.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_an_int_adapter_loads_on_the_weights_it_trained_against(tmp_path, llama, quantize):
    ours = ours_and_saved(llama, quantize, tmp_path / "adapter")
    base = load_model(resolve(llama), quantize=quantize)
    convert.dequantize_model(base, torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)


def test_a_packed_gguf_adapter_loads_on_transformers_gguf_base(tmp_path):
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    write_llama_gguf(tmp_path / "m.gguf", AutoModelForCausalLM.from_config(config), {"linear": "Q4_1"})
    ours = ours_and_saved(str(tmp_path / "m.gguf"), "auto", tmp_path / "adapter")
    assert convert.describe(ours) == {"Q4_1": 14}
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)
