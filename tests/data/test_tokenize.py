"""peftcli/data_tokenize.py: the tokenizer fallback for tokenizers without offsets."""

from __future__ import annotations

from tiny import tiny_tokenizer

from peftcli.data import tokenize as data_tokenize


def test_piecewise_tokenizing_matches_offsets():
    """The path for tokenizers without offsets gives the same ids and masks here (byte-level)."""
    plain_tok = tiny_tokenizer()
    plain_tok.chat_template = None  # a base-model tokenizer
    text, spans = "### Response:\nParis", [(14, 19)]
    ids, mask = next(data_tokenize._tokenize([text], [spans], plain_tok, special=False))
    assert data_tokenize._tokenize_pieces(text, spans, plain_tok, special=False) == (ids, mask)
    assert plain_tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "Paris"

    class PythonTokenizer:  # a Python tokenizer's two methods the fallback uses: [CLS] ids [SEP]
        def encode(self, text, add_special_tokens):
            return plain_tok.encode(text, add_special_tokens=add_special_tokens)

        def build_inputs_with_special_tokens(self, ids):
            return [101] + ids + [102]

    wrapped = data_tokenize._tokenize_pieces(text, spans, PythonTokenizer(), special=True)
    assert wrapped == ([101, *ids, 102], [False, *mask, False])
