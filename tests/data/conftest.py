"""The tokenizers the data tests share: the tiny byte-level one, with its chat template and without."""

from __future__ import annotations

import pytest
from tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    """A base-model tokenizer: no chat template."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    return tokenizer
