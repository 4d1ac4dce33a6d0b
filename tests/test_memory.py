"""memory.py and `peft count`'s memory columns: what a run's weights occupy, from shapes alone.

Oracles: the meta model (the same inventory walked in torch), a loaded model's own storage
(quant.convert.frozen_bytes), and a GGUF file's tensor bytes.
"""

from __future__ import annotations

import json

import pytest
from tiny import llama_2_7b_config, tiny_config, write_llama_gguf
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from peftcli import memory
from peftcli.cli import app
from peftcli.count import count_methods, count_target
from peftcli.methods import make_config
from peftcli.models.gguf_header import read_gguf
from peftcli.models.load import load_model
from peftcli.models.precision import resolve as resolve_precision
from peftcli.models.shapes import config_shapes
from peftcli.models.sources import resolve
from peftcli.quant import convert

runner = CliRunner()
QUANTIZE = ["none", "int8", "int4", "nf4"]


def precision(dtype: str, quantize: str, gguf: bool = False):
    return resolve_precision(dtype, quantize, gguf=gguf, probe_cuda=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("quantize", QUANTIZE)
def test_the_shape_path_and_the_meta_model_agree(tmp_path, monkeypatch, arch, quantize):
    tiny_config(arch).save_pretrained(tmp_path)
    chosen = precision("bfloat16", quantize)
    (from_shapes,) = count_methods(str(tmp_path), [make_config("lora", rank=4)], precision=chosen)
    monkeypatch.setattr("peftcli.count.config_shapes", lambda *a, **k: None)  # force the meta path
    (from_meta,) = count_methods(str(tmp_path), [make_config("lora", rank=4)], precision=chosen)
    assert from_shapes == from_meta
    assert from_shapes.trained_bytes == 16 * from_shapes.trainable


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_the_estimate_is_what_a_loaded_base_holds(tmp_path, quantize):
    """The loaded model also holds the rotary frequencies (64 bytes) and, for NF4, each layer's 16 levels."""
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path)
    shapes = config_shapes(str(tmp_path))
    estimate = memory.frozen_bytes(memory.inventory_of_shapes(shapes), precision("float32", quantize))
    base = load_model(resolve(str(tmp_path)), dtype="float32", quantize=quantize).requires_grad_(False)
    loaded = convert.frozen_bytes(base)
    assert estimate <= loaded <= estimate + 64 + (14 * 64 if quantize == "nf4" else 0)


def test_a_gguf_file_counts_its_packed_blocks(tmp_path):
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    write_llama_gguf(tmp_path / "m.gguf", AutoModelForCausalLM.from_config(config), {"linear": "Q4_1"})
    _, (counted,), chosen = count_target(str(tmp_path / "m.gguf"), ["lora"], {}, dtype="float32")
    assert chosen.quantize == "gguf"
    file_bytes = sum(e.nbytes for e in read_gguf(str(tmp_path / "m.gguf")).tensors)
    assert counted.frozen_bytes == file_bytes  # F32 embedding and norms at float32, Q4_1 as stored
    loaded = convert.frozen_bytes(load_model(resolve(str(tmp_path / "m.gguf")), dtype="float32"))
    assert loaded == file_bytes + 64  # + the rotary frequencies


def test_the_packaged_smollm2_file_is_held_at_its_own_size():
    _, (counted,), chosen = count_target("smollm2-135m-instruct", ["lora"], {}, dtype="float32")
    source = resolve("smollm2-135m-instruct")
    tensors = read_gguf(f"{source.path}/{source.gguf_file}").tensors
    assert chosen.quantize == "gguf" and counted.frozen_bytes == sum(e.nbytes for e in tensors)
    _, (dense,), _ = count_target("smollm2-135m-instruct", ["lora"], {}, dtype="float32", quantize="none")
    assert dense.frozen_bytes > 5 * counted.frozen_bytes


def test_a_7b_model_in_4_bits_fits_in_5_gib(tmp_path):
    llama_2_7b_config().save_pretrained(tmp_path)
    _, (fp32,), _ = count_target(str(tmp_path), ["lora"], {}, dtype="float32", quantize="none")
    _, (int4,), _ = count_target(str(tmp_path), ["lora"], {}, dtype="bfloat16", quantize="int4")
    assert fp32.frozen_bytes == 4 * 6_738_415_616
    # 6.48e9 linear weights at 20 bytes per 32, embedding and head at bf16
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert int4.frozen_bytes == linear * 20 // 32 + 2 * (6_738_415_616 - linear)
    assert int4.frozen_bytes < 5 * 2**30


def test_cli_memory_table_json_and_bad_values(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)
    result = runner.invoke(app, ["count", str(tmp_path), "--quantize", "int4", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "frozen base" in result.stdout and "trained + AdamW" in result.stdout and "int4" in result.stdout
    result = runner.invoke(app, ["count", str(tmp_path), "--quantize", "nf4", "--json"])
    (row,) = json.loads(result.stdout)
    assert row["memory"]["total_bytes"] == row["memory"]["frozen_bytes"] + row["memory"]["trained_bytes"]
    assert row["precision"]["quantize"] == "nf4"
    result = runner.invoke(app, ["count", str(tmp_path), "--quantize", "int3"])
    assert result.exit_code == 2 and "--quantize" in result.stderr and "int4" in result.stderr
    result = runner.invoke(app, ["count", str(tmp_path), "--dtype", "fp8"])
    assert result.exit_code == 2 and "--dtype" in result.stderr


def test_a_recipe_counts_with_its_own_precision(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path / "model")
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "r.yaml").write_text(
        f"model:\n  name: {tmp_path / 'model'}\n  quantize: int8\n  dtype: float32\n"
        f"data:\n  train: {tmp_path / 'd.jsonl'}\n"
    )
    _, _, chosen = count_target(str(tmp_path / "r.yaml"), [], {})
    assert (chosen.quantize, chosen.dtype) == ("int8", "float32")
