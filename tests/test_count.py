"""`peft count`: meta-device counts equal HF PEFT's get_nb_trainable_parameters()."""

import json

import pytest
import torch
from peft import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    VeraConfig,
    get_peft_model,
)
from tiny import llama_2_7b_config, tiny_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.count import count_methods
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
            make_config("lora", rank=4, use_dora=True, init="pissa", loraplus_lr_ratio=16.0),
        ],
        task,
    )
    refs = [
        LoraConfig(task_type=task_type, r=4, lora_alpha=16),
        PrefixTuningConfig(task_type=task_type, num_virtual_tokens=5),
        PromptTuningConfig(task_type=task_type, num_virtual_tokens=5),
        LoraConfig(task_type=task_type, r=4, lora_alpha=16, use_dora=True, init_lora_weights="pissa"),
    ]
    for count, ref in zip(ours, refs, strict=True):
        assert (count.trainable, count.total) == _hf_count(config, task, ref), count.method


# The methods of adapted layers, ours and HF PEFT's config for the same adapter; HF PEFT 0.21 leaves GPT-2's
# Conv1D layers out of LoHa, LoKr and OFT (tests/models/test_shapes.py holds those counts to the meta model).
LAYER_METHODS = [
    (make_config("ia3"), lambda task_type: IA3Config(task_type=task_type), True),
    (make_config("vera", rank=16), lambda task_type: VeraConfig(task_type=task_type, r=16), True),
    (make_config("loha", rank=4), lambda task_type: LoHaConfig(task_type=task_type, r=4), False),
    (
        make_config("lokr", rank=2, decompose_both=True),
        lambda task_type: LoKrConfig(task_type=task_type, r=2, decompose_both=True),
        False,
    ),
    (
        make_config("oft", block_size=8),
        lambda task_type: OFTConfig(task_type=task_type, oft_block_size=8),
        False,
    ),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bert", "roberta"])
def test_layer_method_counts_equal_hf_peft(tmp_path, arch):
    config = tiny_config(arch)
    task = "causal-lm" if arch in ("llama", "gpt2", "opt") else "sequence-classification"
    task_type = "CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS"
    cases = [(ours, ref) for ours, ref, conv1d in LAYER_METHODS if arch != "gpt2" or conv1d]
    counts = count_methods(_config_dir(tmp_path, config), [ours for ours, _ in cases], task)
    for count, (_, ref) in zip(counts, cases, strict=True):
        assert (count.trainable, count.total) == _hf_count(config, task, ref(task_type)), count.method


def test_gpt3_175b_layer_method_counts(tmp_path):
    """From the shapes alone, each method's own arithmetic: c_attn (12288 -> 3 x 12288) and, for IA3, the
    feed-forward output projection (49152 -> 12288, its input scaled), in 96 layers."""
    config = GPT2Config(vocab_size=50257, n_positions=2048, n_embd=12288, n_layer=96, n_head=96)
    methods = [make_config(name) for name in ("ia3", "vera", "loha", "lokr", "oft")]
    counts = {c.method: c.trainable for c in count_methods(_config_dir(tmp_path, config), methods)}
    d = 12288
    assert counts == {
        "ia3": 96 * (3 * d + 4 * d),
        "vera": 96 * (3 * d + 256),
        "loha": 96 * 2 * 8 * (d + 3 * d),
        # in 12288 = 96 x 128, out 36864 = 192 x 192: W1 (192, 96) whole, W2 (192, 128) a rank-8 product
        "lokr": 96 * (192 * 96 + 8 * (192 + 128)),
        "oft": 96 * (d // 32) * 32 * 31 // 2,
    }


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
def test_count_gives_each_methods_count_or_why_it_does_not_apply(tmp_path, arch):
    path = _config_dir(tmp_path, tiny_config(arch))
    methods = [
        make_config("lora", rank=2),
        make_config("lora", target_modules=["nope_proj"]),
        make_config("bitfit"),
        make_config("prompt-tuning", num_virtual_tokens=3),
    ]
    results = count_methods(path, methods, "causal-lm")
    fits = [methods[i] for i in ((0, 2, 3) if arch == "opt" else (0, 3))]
    assert [r for r in results if not r.error] == count_methods(path, fits, "causal-lm")
    assert results[1].error and "nope_proj" in results[1].error
    if arch == "llama":  # bias-free
        assert results[2].error and "no bias terms" in results[2].error
