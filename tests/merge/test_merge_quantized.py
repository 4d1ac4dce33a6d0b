"""`peft merge` of a run that trained on quantized weights: the LoRA is folded into those weights,
dequantized, never into a re-read original; the check compares with base + adapter as trained."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from tiny import randomise, save_tiny, tiny_model

from peftcli.merge import to_dir as merge
from peftcli.methods import Context, lora, make_config
from peftcli.models.load import load_model
from peftcli.models.sources import resolve
from peftcli.quant import convert
from peftcli.recipe import DataSection, ModelSection, Recipe, dump_recipe
from peftcli.runs import adapter as checkpoint

SECTION = make_config("lora", rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("llama"), "llama"))


def trained_on(tmp_path, base: str, quantize: str):
    """An adapter dir as a run on `base` stored as `quantize` leaves it (recipe.yaml included); returns the
    model it describes (quantized base + adapter)."""
    model = lora.inject(load_model(resolve(base), quantize=quantize), SECTION, Context("causal-lm"))
    randomise(model, scale=0.05)
    checkpoint.save_adapter(model, SECTION, "causal-lm", base, tmp_path / "adapter")
    recipe = Recipe(
        model=ModelSection(name=base, quantize=quantize), method=SECTION, data=DataSection(train="x")
    )
    (tmp_path / "adapter" / "recipe.yaml").write_text(dump_recipe(recipe))
    return model.eval()


@pytest.mark.parametrize("quantize", ["int4", "nf4"])
def test_folds_into_the_dequantized_weights_the_adapter_trained_against(tmp_path, llama, quantize):
    model = trained_on(tmp_path, llama, quantize)
    console = Console(record=True, width=200)
    result = merge.merge_to_dir(tmp_path / "adapter", tmp_path / "merged", console=console)
    text = console.export_text()
    assert f"trained on {quantize} weights" in text and "base + adapter as trained" in text
    assert not result.streamed and result.dtype == torch.float32 and result.max_abs_diff <= 1e-4
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    layer = model.model.layers[1]
    # a layer the adapter left alone: the quantized weight as trained, not the original file's
    o_proj = merged["model.layers.1.self_attn.o_proj.weight"]
    assert torch.equal(o_proj, layer.self_attn.o_proj.dequantize())
    assert not torch.equal(o_proj, tiny_model("llama", "causal-lm").model.layers[1].self_attn.o_proj.weight)
    # an adapted one: that weight plus scale * B @ A
    q = layer.self_attn.q_proj
    delta = q.scale * q.lora_B.weight @ q.lora_A.weight
    torch.testing.assert_close(merged["model.layers.1.self_attn.q_proj.weight"], q.base.dequantize() + delta)


def test_a_plain_run_still_streams(tmp_path, llama):
    trained_on(tmp_path, llama, "none")
    result = merge.merge_to_dir(tmp_path / "adapter", tmp_path / "merged")
    assert result.streamed and result.max_abs_diff <= 1e-4
    assert not any(convert.is_quantized(m) for m in load_model(resolve(str(tmp_path / "merged"))).modules())
