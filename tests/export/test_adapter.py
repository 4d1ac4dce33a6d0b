"""What a llama.cpp LoRA file cannot carry, and what llama.cpp cannot run, is refused with the reason before
anything is loaded or written."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tiny import save_bpe_base, save_tiny, tiny_tokenizer

from peftcli.errors import UserError
from peftcli.export import run as export
from peftcli.export.adapter import check_adapter_only
from peftcli.methods import METHODS, Context, make_config
from peftcli.models.load import load_model
from peftcli.models.sources import resolve
from peftcli.runs import adapter as checkpoint


def method_run(directory, base, method: str, task: str = "causal-lm", **fields):
    model = load_model(resolve(str(base)), task, num_labels=3 if task != "causal-lm" else None)
    config = make_config(method, **fields)
    model = METHODS[method].inject(model, config, Context(task))
    checkpoint.save_adapter(model, config, task, str(base), directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def test_dora_and_modules_to_save_cannot_be_a_llamacpp_lora():
    def adapter(**method):
        return SimpleNamespace(
            path="run", method=SimpleNamespace(**{"name": "lora", "modules_to_save": None, **method})
        )

    with pytest.raises(UserError, match="DoRA"):
        check_adapter_only(adapter(use_dora=True), None)
    with pytest.raises(UserError, match="lm_head in full"):
        check_adapter_only(adapter(modules_to_save=["lm_head"]), None)
    check_adapter_only(adapter(use_dora=False), None)  # plain LoRA passes


@pytest.mark.parametrize(
    ("arch", "method", "adapter_only", "message"),
    [
        (
            "llama",
            "prefix-tuning",
            True,
            "writes LoRA adapters for llama.cpp; .* holds a prefix-tuning adapter",
        ),
        ("llama", "prompt-tuning", False, "cannot merge"),
        ("opt", "lora", False, "`opt` models are not exported"),
    ],
)
def test_what_llamacpp_cannot_run_is_refused(tmp_path, arch, method, adapter_only, message):
    base = save_bpe_base(tmp_path / "base", arch) if arch != "opt" else save_tiny(tmp_path / "base", "opt")
    fields = {"num_virtual_tokens": 4} if method != "lora" else {}
    run = method_run(tmp_path / "run", base, method, **fields)
    with pytest.raises(UserError, match=message):
        export.export_run(run, tmp_path / "out.gguf", adapter_only=adapter_only)
    assert not (tmp_path / "out.gguf").exists()


def test_encoders_and_classifiers_are_refused(tmp_path):
    bert = save_tiny(tmp_path / "bert", "bert")
    run = method_run(tmp_path / "bert-run", bert, "lora", task="sequence-classification")
    with pytest.raises(UserError, match="causal language models .* sequence-classification adapter"):
        export.export_run(run, tmp_path / "out.gguf")
