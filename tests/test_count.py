"""`peft count`: meta-device counts equal HF PEFT's get_nb_trainable_parameters()."""

import json

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from tiny import llama_2_7b_config, tiny_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.count import count_methods, count_or_refusal
from peftcli.errors import UserError
from peftcli.methods import make_config

runner = CliRunner()


def _config_dir(tmp_path, config):
    config.save_pretrained(tmp_path)  # config.json only: no weights
    return str(tmp_path)


def _hf_count(config, task, peft_config):
    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    torch.manual_seed(0)
    return get_peft_model(cls.from_config(config), peft_config).get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bert", "roberta"])
def test_counts_equal_hf_peft(tmp_path, arch):
    config = tiny_config(arch)
    task = "causal-lm" if arch in ("llama", "gpt2", "opt") else "sequence-classification"
    task_type = "CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS"
    path = _config_dir(tmp_path, config)
    ours = count_methods(
        path,
        [
            make_config("lora", rank=4),
            make_config("prefix-tuning", num_virtual_tokens=5),
            make_config("prompt-tuning", num_virtual_tokens=5),
        ],
        task,
    )
    refs = [
        LoraConfig(task_type=task_type, r=4, lora_alpha=16),
        PrefixTuningConfig(task_type=task_type, num_virtual_tokens=5),
        PromptTuningConfig(task_type=task_type, num_virtual_tokens=5),
    ]
    for count, ref in zip(ours, refs, strict=True):
        assert (count.trainable, count.total) == _hf_count(config, task, ref), count.method


def test_llama_7b_lora_count_from_cli(tmp_path):
    config = llama_2_7b_config()
    path = _config_dir(tmp_path, config)
    result = runner.invoke(
        app, ["count", path, "--method", "lora", "--rank", "8", "--target-modules", "q_proj,v_proj", "--json"]
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["method"] == "lora"
    assert row["trainable"] == 4_194_304
    assert row["total"] == 6_742_609_920
    assert row["trainable_percent"] == pytest.approx(100 * 4_194_304 / 6_742_609_920, abs=1e-6)


def test_table_has_one_row_per_method(tmp_path):
    path = _config_dir(tmp_path, tiny_config("llama"))
    result = runner.invoke(app, ["count", path, "-m", "lora", "-m", "prompt-tuning", "-m", "adapter"])
    assert result.exit_code == 0, result.output
    for name in ("lora", "prompt-tuning", "adapter", "trainable"):
        assert name in result.stdout


def test_gpt3_175b_config_counts(tmp_path):
    # GPT-3 175B's shape (Brown et al. 2020): 96 layers, d_model 12288, 96 heads, 2048 context.
    config = GPT2Config(vocab_size=50257, n_positions=2048, n_embd=12288, n_layer=96, n_head=96)
    path = _config_dir(tmp_path, config)
    (count,) = count_methods(path, [make_config("lora", rank=8)])
    base = 96 * (12 * 12288**2 + 13 * 12288) + 50257 * 12288 + 2048 * 12288 + 2 * 12288
    lora = 96 * 8 * (12288 + 3 * 12288)  # c_attn: in 12288 -> out 3 x 12288
    assert count.trainable == lora
    assert count.total == base + lora
    assert count.total > 174e9


def test_bad_method_and_task_are_clean_errors(tmp_path):
    path = _config_dir(tmp_path, tiny_config("llama"))
    result = runner.invoke(app, ["count", path, "--method", "lorra"])
    assert result.exit_code == 2
    assert "did you mean `lora`" in result.stderr
    result = runner.invoke(app, ["count", path, "--task", "qa"])
    assert result.exit_code == 2 and "--task" in result.stderr
    result = runner.invoke(app, ["count", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not found" in result.stderr


def test_count_an_adapter_dir_written_by_hf_peft(tmp_path):
    base = tmp_path / "base"
    config = tiny_config("llama")
    config.save_pretrained(base)
    torch.manual_seed(0)
    hf = get_peft_model(
        AutoModelForCausalLM.from_config(config),
        LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["k_proj"]),
    )
    hf.peft_config["default"].base_model_name_or_path = str(base)
    hf.save_pretrained(tmp_path / "adapter")
    result = runner.invoke(app, ["count", str(tmp_path / "adapter"), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert (row["trainable"], row["total"]) == hf.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", ["llama", "opt"])  # from shapes; on the meta model (OPT is not modelled)
def test_count_or_refusal_gives_each_methods_count_or_why_it_does_not_apply(tmp_path, arch):
    path = _config_dir(tmp_path, tiny_config(arch))
    methods = [
        make_config("lora", rank=2),
        make_config("lora", target_modules=["nope_proj"]),
        make_config("bitfit"),
        make_config("prompt-tuning", num_virtual_tokens=3),
    ]
    results = count_or_refusal(path, methods, "causal-lm")
    fits = [methods[i] for i in ((0, 2, 3) if arch == "opt" else (0, 3))]
    assert [r for r in results if not isinstance(r, UserError)] == count_methods(path, fits, "causal-lm")
    assert isinstance(results[1], UserError) and "nope_proj" in str(results[1])
    if arch == "llama":  # bias-free
        assert isinstance(results[2], UserError) and "no bias terms" in str(results[2])
