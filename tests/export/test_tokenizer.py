"""The tokenizer as written for llama.cpp: token types, merges, llama.cpp's pre-tokenizer name, and llama.cpp
tokenizing tricky text exactly as the run's tokenizer does."""

from __future__ import annotations

import pytest
from tiny import SPECIALS, bpe_tokenizer, save_gguf_base, tiny_tokenizer
from tokenizers import Regex, pre_tokenizers
from transformers import AutoTokenizer

from peftcli.errors import UserError
from peftcli.export.llamacpp import LlamaCpp
from peftcli.export.tokenizer import CONTROL, NORMAL, UNUSED, tokenizer_metadata
from peftcli.infer.prompt import end_of_turn_id

TRICKY = [
    "hello world, the quick brown fox",
    "  two  spaces\tand a tab\n\nnew lines",
    "numbers 1234567 and 3.14159",
    "ünïcödé, emoji 🦊 and 日本語",
    "<|im_start|>user\nhi<|im_end|>\n",  # special tokens in text are parsed as such
    "don't you'll we've",
]


def test_types_merges_and_special_ids():
    tokenizer = bpe_tokenizer()
    metadata = tokenizer_metadata(tokenizer, len(tokenizer) + 3, None)  # 3 rows of padding in the model
    tokens, types = metadata["tokenizer.ggml.tokens"][0], metadata["tokenizer.ggml.token_type"][0]
    assert tokens[: len(SPECIALS)] == SPECIALS and set(types[: len(SPECIALS)]) == {CONTROL}
    assert types[len(SPECIALS)] == NORMAL and types[-3:] == [UNUSED] * 3
    assert tokens[-1] == f"[PAD{len(tokenizer) + 2}]"
    merges = metadata["tokenizer.ggml.merges"][0]
    assert merges and all(len(m.split(" ")) == 2 for m in merges)
    assert metadata["tokenizer.ggml.pre"][0] == "gpt-2"
    assert metadata["tokenizer.ggml.eos_token_id"][0] == tokenizer.eos_token_id
    assert metadata["tokenizer.ggml.add_bos_token"][0] is False
    # the chat template's end of turn (<|im_end|>) differs from EOS (</s>): written for llama.cpp to stop at
    assert (
        metadata["tokenizer.ggml.eot_token_id"][0]
        == end_of_turn_id(tokenizer)
        == SPECIALS.index("<|im_end|>")
    )


@pytest.mark.parametrize("digits", [False, True])
def test_llamacpp_tokenizes_like_the_run(tmp_path, digits, monkeypatch):
    """GPT-2's pre-tokenizer ("gpt-2"), and SmolLM's, which splits digits first ("smollm")."""
    tokenizer = bpe_tokenizer()
    if digits:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        monkeypatch.setattr("tiny.bpe_tokenizer", lambda: tokenizer)
    path = save_gguf_base(tmp_path / "m.gguf", "llama")
    tokenizer.save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    pre = tokenizer_metadata(tokenizer, len(tokenizer), None)["tokenizer.ggml.pre"][0]
    assert pre == ("smollm" if digits else "gpt-2")
    with LlamaCpp(path) as llama:
        assert llama.warnings == []
        for text in TRICKY:
            assert llama.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_tokenizers_llamacpp_cannot_read_are_refused(tmp_path):
    wordpiece = AutoTokenizer.from_pretrained(_bert_tokenizer_dir(tmp_path))
    with pytest.raises(UserError, match="byte-level BPE tokenizers"):
        tokenizer_metadata(wordpiece, len(wordpiece), None)
    split = bpe_tokenizer()
    split.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    with pytest.raises(UserError, match="no pre-tokenizer known here"):
        tokenizer_metadata(split, len(split), None)
    with pytest.raises(UserError, match="ids up to"):
        tokenizer_metadata(tiny_tokenizer(), 100, None)


def _bert_tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"
