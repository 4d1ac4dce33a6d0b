"""load.py's tokenizer of a GGUF base: the tokenizer AutoTokenizer makes of a llama GGUF file, without its
full parse of the file (about 10 s for the packaged SmolLM2); AutoTokenizer itself for anything else."""

from __future__ import annotations

import filecmp

import pytest
import transformers.modeling_gguf_pytorch_utils as gguf_utils
from tiny import save_gguf_base
from transformers import AutoTokenizer

from peftcli.models import load
from peftcli.models.sources import resolve


def _auto(source):
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.mark.parametrize("base", ["smollm2", "tiny"])
def test_a_llama_gguf_tokenizer_is_autotokenizers_without_its_full_parse(tmp_path, monkeypatch, base):
    source = resolve(
        "smollm2-135m-instruct" if base == "smollm2" else str(save_gguf_base(tmp_path / "base.gguf", "llama"))
    )
    theirs = _auto(source)

    def refuse(*args, **kwargs):
        raise AssertionError("parsed the whole GGUF file")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", refuse)
    ours = load.load_tokenizer(source)
    assert type(ours) is type(theirs)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    names = sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert filecmp.cmpfiles(tmp_path / "ours", tmp_path / "theirs", names, shallow=False)[0] == names
    text = "Velmora Guide: pack a coat 🙂 <|im_end|>"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]


def test_anything_else_goes_through_autotokenizer(tmp_path):
    gguf = save_gguf_base(tmp_path / "llama" / "base.gguf", "llama")
    assert load._tokenizer_class(resolve(str(gguf))) is not AutoTokenizer
    (gguf.parent / "tokenizer_config.json").write_text(
        "{}"
    )  # a config beside the file: AutoTokenizer reads it
    assert load._tokenizer_class(resolve(str(gguf))) is AutoTokenizer
    gpt2 = save_gguf_base(tmp_path / "gpt2" / "base.gguf", "gpt2")  # not read as llama
    assert load._tokenizer_class(resolve(str(gpt2))) is AutoTokenizer
    assert load._tokenizer_class(resolve(str(gguf.with_suffix(".hf")))) is AutoTokenizer  # a model dir
