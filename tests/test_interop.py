"""Adapter dirs written by HF PEFT's `save_pretrained`, end to end: `peft generate`, `predict`, `count`,
`merge` and `train` (method.from_adapter) take them; what peftcli cannot reproduce is refused by name.

HF PEFT 0.21.2's own forward is the reference. With transformers 5.24 it cannot run prefix tuning for
sequence classification, and its `generate` ignores a prefix (see tests/methods/test_prefix.py), so
prefix adapters here are causal LMs compared through HF's forward.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import HF_TASK, logits, randomise, save_tiny
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

from peftcli import infer as generate
from peftcli.cli import app
from peftcli.errors import UserError
from peftcli.methods import METHODS
from peftcli.recipe import load_recipe
from peftcli.runs import adapter as checkpoint
from peftcli.train import loop as train
from peftcli.train.run import run as train_run

runner = CliRunner()
CLASSIFY = "sequence-classification"
CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]
    }
    for i in range(16)
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: save_tiny(root / arch, arch) for arch in ("llama", "gpt2", "bert")}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTCLI_CACHE", str(tmp_path / "cache"))


def hf_config(kind: str, task: str, **fields):
    if kind == "lora":
        fields = {"lora_alpha": 8, "init_lora_weights": False, **fields}
        return peft.LoraConfig(task_type=HF_TASK[task], r=4, **fields)
    if kind == "prefix-tuning":
        return peft.PrefixTuningConfig(task_type=HF_TASK[task], num_virtual_tokens=4, **fields)
    return peft.PromptTuningConfig(task_type=HF_TASK[task], num_virtual_tokens=4, **fields)


def hf_adapter(directory: Path, base: Path, kind: str, task: str, **fields) -> peft.PeftModel:
    """HF PEFT's adapter on `base` (so base_model_name_or_path is that dir), random weights, saved."""
    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    torch.manual_seed(0)  # HF's init (random B with init_lora_weights=False) draws from the global generator
    model = peft.get_peft_model(cls.from_pretrained(base), hf_config(kind, task, **fields))
    randomise(model, scale=0.3, seed=5)
    model.save_pretrained(directory)
    assert (directory / checkpoint.WEIGHTS_NAME).is_file() and not (directory / "adapter_model.bin").exists()
    return model.eval()


def edit_config(directory: Path, **fields) -> None:
    path = directory / checkpoint.CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


CASES = [
    ("lora", "llama", "causal-lm"),
    ("lora", "gpt2", "causal-lm"),
    ("lora", "bert", CLASSIFY),
    ("lora", "llama", CLASSIFY),
    ("prefix-tuning", "llama", "causal-lm"),
    ("prefix-tuning", "gpt2", "causal-lm"),
    ("prompt-tuning", "llama", "causal-lm"),
    ("prompt-tuning", "gpt2", "causal-lm"),
    ("prompt-tuning", "bert", CLASSIFY),
]
IDS = [f"{kind}-{arch}-{'cls' if task == CLASSIFY else 'lm'}" for kind, arch, task in CASES]


# --------------------------------------------------------------------------------------------------
# peft generate / predict / count


@pytest.mark.parametrize(("kind", "arch", "task"), CASES, ids=IDS)
def test_generate_loads_hf_adapter_dirs(tmp_path, bases, kind, arch, task):
    hf = hf_adapter(tmp_path / "hf", bases[arch], kind, task)
    model, tokenizer, info = generate.load_for_inference(tmp_path / "hf")
    assert (info.method, info.task, info.base) == (kind, task, str(bases[arch]))
    got = logits(model)
    assert got.shape == logits(hf).shape
    assert (got - logits(hf)).abs().max() <= 1e-5
    if task == CLASSIFY:
        with torch.no_grad():
            probs = hf(**tokenizer("a fine day", return_tensors="pt")).logits[0].softmax(-1)
        label = hf.config.id2label[int(probs.argmax())]
        assert generate.run_predict(tmp_path / "hf", "a fine day") == f"{label} (p={float(probs.max()):.2f})"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_text_equals_hf_greedy_with_a_lora_adapter(tmp_path, bases, arch):
    hf = hf_adapter(tmp_path / "hf", bases[arch], "lora", "causal-lm")
    text = generate.run_generate(tmp_path / "hf", "Say hi", max_new_tokens=8)
    _, tokenizer, info = generate.load_for_inference(tmp_path / "hf")
    ids, mask = generate.encode_prompt(
        tokenizer, "Say hi", generate.prompt_style(tokenizer, info.data_format, raw=False)
    )
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.parametrize(
    ("kind", "arch", "task"),
    [
        ("lora", "bert", CLASSIFY),
        ("prefix-tuning", "gpt2", "causal-lm"),
        ("prompt-tuning", "llama", "causal-lm"),
    ],
)
def test_count_takes_hf_adapter_dirs(tmp_path, bases, kind, arch, task):
    hf = hf_adapter(tmp_path / "hf", bases[arch], kind, task)
    result = runner.invoke(app, ["count", str(tmp_path / "hf"), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["method"] == kind and (row["trainable"], row["total"]) == hf.get_nb_trainable_parameters()


# --------------------------------------------------------------------------------------------------
# peft merge


@pytest.mark.parametrize(("arch", "task"), [("llama", "causal-lm"), ("bert", CLASSIFY), ("llama", CLASSIFY)])
def test_merge_cli_takes_an_hf_lora_dir(tmp_path, bases, arch, task):
    hf = hf_adapter(tmp_path / "hf", bases[arch], "lora", task)
    result = runner.invoke(app, ["merge", str(tmp_path / "hf"), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    merged = cls.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged) - logits(hf)).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_takes_an_hf_head_trained_in_full(tmp_path, bases, arch):
    """modules_to_save=[lm_head] in HF's key layout; on gpt2 the head is tied to wte and must come untied."""
    hf = hf_adapter(tmp_path / "hf", bases[arch], "lora", "causal-lm", modules_to_save=["lm_head"])
    result = runner.invoke(app, ["merge", str(tmp_path / "hf"), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.lm_head.weight is not merged.get_input_embeddings().weight
    assert (logits(merged) - logits(hf)).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["prefix-tuning", "prompt-tuning"])
def test_merge_cli_refuses_hf_virtual_token_adapters(tmp_path, bases, kind):
    hf_adapter(tmp_path / "hf", bases["llama"], kind, "causal-lm")
    result = runner.invoke(app, ["merge", str(tmp_path / "hf"), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "cannot merge" in message and "cannot be folded" in message and "peft generate" in message
    assert not (tmp_path / "merged").exists()


# --------------------------------------------------------------------------------------------------
# Fields: unused ones are ignored, ones that change the math are refused by name


@pytest.mark.parametrize(
    ("kind", "arch"), [("lora", "llama"), ("prefix-tuning", "gpt2"), ("prompt-tuning", "llama")]
)
def test_fields_peftcli_does_not_use_are_ignored(tmp_path, bases, kind, arch):
    hf = hf_adapter(tmp_path / "hf", bases[arch], kind, "causal-lm")
    edit_config(tmp_path / "hf", future_field={"x": 1}, peft_version="9.9.9", auto_mapping=None)
    model, _, _ = generate.load_for_inference(tmp_path / "hf")
    assert (logits(model) - logits(hf)).abs().max() <= 1e-5


def test_fields_peftcli_does_not_use_are_noted(tmp_path, bases, caplog):
    hf_adapter(tmp_path / "hf", bases["llama"], "lora", "causal-lm")
    edit_config(tmp_path / "hf", future_field={"x": 1})
    with caplog.at_level(logging.INFO):
        generate.load_for_inference(tmp_path / "hf")
    assert "future_field" in caplog.text


@pytest.mark.parametrize(
    "fields",
    [{"layers_to_transform": [0]}, {"lora_bias": True}, {"rank_pattern": {"q_proj": 2}}, {"bias": "all"}],
    ids=lambda f: next(iter(f)),
)
def test_a_field_that_changes_the_math_is_refused_by_name(tmp_path, bases, fields):
    hf_adapter(tmp_path / "hf", bases["llama"], "lora", "causal-lm", **fields)
    field = next(iter(fields))
    with pytest.raises(UserError, match=field):
        generate.load_for_inference(tmp_path / "hf")
    result = runner.invoke(app, ["merge", str(tmp_path / "hf"), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 2 and field in result.stderr and not (tmp_path / "merged").exists()
    recipe = write_recipe(tmp_path, bases["llama"], "lora", tmp_path / "hf")
    with pytest.raises(UserError, match=field):
        train.setup(recipe)


@pytest.mark.parametrize("kind", ["prefix-tuning", "prompt-tuning"])
def test_an_encoder_decoder_virtual_token_adapter_is_refused_by_name(tmp_path, bases, kind):
    hf_adapter(tmp_path / "hf", bases["llama"], kind, "causal-lm")
    edit_config(tmp_path / "hf", num_transformer_submodules=2)
    with pytest.raises(UserError, match="num_transformer_submodules"):
        generate.load_for_inference(tmp_path / "hf")


def test_a_pickle_only_adapter_dir_is_refused(tmp_path, bases):
    hf_adapter(tmp_path / "hf", bases["llama"], "lora", "causal-lm")
    (tmp_path / "hf" / checkpoint.WEIGHTS_NAME).rename(tmp_path / "hf" / "adapter_model.bin")
    with pytest.raises(UserError, match="pickle"):
        generate.load_for_inference(tmp_path / "hf")
    result = runner.invoke(app, ["merge", str(tmp_path / "hf"), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 2 and "safetensors" in result.stderr


# --------------------------------------------------------------------------------------------------
# peft train: continue from an HF PEFT adapter


def write_recipe(tmp_path: Path, base: Path, method: str, from_adapter: Path, max_steps: int = 2):
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in CHAT))
    recipe = {
        "model": {"name": str(base), "task": "causal-lm"},
        "method": {"name": method},
        "data": {
            "train": str(tmp_path / "data.jsonl"),
            "format": "chat",
            "validation": 0.25,
            "max_length": 64,
        },
        "train": {"max_steps": max_steps, "batch_size": 4, "learning_rate": 1e-2, "seed": 0},
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(tmp_path / "recipe.yaml", overrides=[f"method.from_adapter={from_adapter}"])


@pytest.mark.parametrize(
    ("kind", "arch"), [("lora", "llama"), ("prefix-tuning", "gpt2"), ("prompt-tuning", "llama")]
)
def test_train_starts_from_the_hf_adapter_and_hf_loads_the_result(tmp_path, bases, kind, arch):
    hf_adapter(tmp_path / "hf", bases[arch], kind, "causal-lm")
    saved = load_file(tmp_path / "hf" / checkpoint.WEIGHTS_NAME)
    s = train.setup(write_recipe(tmp_path, bases[arch], kind, tmp_path / "hf"))
    start = METHODS[kind].adapter_state(s.accelerator.unwrap_model(s.model))
    assert start.keys() == saved.keys()
    assert all(torch.equal(start[key], saved[key]) for key in saved)

    summary = train_run(write_recipe(tmp_path, bases[arch], kind, tmp_path / "hf"), overwrite=True)
    assert summary["steps"] == 2
    trained = load_file(tmp_path / "run" / checkpoint.WEIGHTS_NAME)
    assert trained.keys() == saved.keys() and any(not torch.equal(trained[k], saved[k]) for k in saved)
    # HF PEFT loads the continued adapter and computes what we compute.
    again = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(bases[arch]), tmp_path / "run"
    )
    ours, _, _ = generate.load_for_inference(tmp_path / "run")
    assert (logits(again.eval()) - logits(ours)).abs().max() <= 1e-5
    if kind == "lora":  # and the run dir merges, its tokenizer along
        result = runner.invoke(app, ["merge", str(tmp_path / "run"), "--output", str(tmp_path / "merged")])
        assert result.exit_code == 0, result.output
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert (logits(merged) - logits(ours)).abs().max() <= 1e-4
        assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize(
    "fields",
    [{"use_dora": True}, {"init_lora_weights": "pissa"}, {"init_lora_weights": "olora", "use_dora": True}],
    ids=["dora", "pissa-unconverted", "olora-dora-unconverted"],
)
def test_train_continues_an_hf_dora_or_pissa_adapter_and_hf_loads_the_result(tmp_path, bases, fields):
    # An unconverted PiSSA/OLoRA adapter belongs to the residual of the base it names: both sides recompute
    # it on load. The continued adapter is saved converted, a plain LoRA of the original base.
    hf = hf_adapter(tmp_path / "hf", bases["llama"], "lora", "causal-lm", **fields)
    s = train.setup(write_recipe(tmp_path, bases["llama"], "lora", tmp_path / "hf"))
    assert (logits(s.accelerator.unwrap_model(s.model).eval()) - logits(hf)).abs().max() <= 1e-5
    assert (
        train_run(write_recipe(tmp_path, bases["llama"], "lora", tmp_path / "hf"), overwrite=True)["steps"]
        == 2
    )
    saved = json.loads((tmp_path / "run" / checkpoint.CONFIG_NAME).read_text())
    converted = "init_lora_weights" in fields
    assert (saved["r"], saved["init_lora_weights"], saved["use_dora"]) == (
        8 if converted else 4,
        True,
        bool(fields.get("use_dora")),
    )
    again = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(bases["llama"]), tmp_path / "run"
    )
    ours, _, _ = generate.load_for_inference(tmp_path / "run")
    assert (logits(again.eval()) - logits(ours)).abs().max() <= 1e-5
    assert (logits(ours) - logits(hf)).abs().max() > 1e-4  # it trained
