"""Rendered text and target spans -> token ids and a target mask per example; truncation; packing.

A token is a target when its characters overlap a target span. Causal-LM examples end in EOS (a target:
the model learns to stop) unless a chat template wrote its own end, are cut to max_length, and are dropped
when no target is left to learn. Segments are tokenized piece by piece and joined, with nothing added;
tokenized rows are taken as they are (cut to max_length).

Packing concatenates the examples (each ending in EOS) and cuts the stream into max_length rows. Attention
is NOT blocked between examples that share a row: a token may attend to the end of the example before it.
This is plain GPT-style packing; the EOS separators mark where an example ends, and attending to an
unrelated example costs little. Labels keep their masks, so packed prompts stay untrained.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from peftcli.data.render import Spans
from peftcli.data.rows import IGNORE_INDEX

if TYPE_CHECKING:
    from peftcli.recipe import DataSection

Example = tuple[Tensor, Tensor]  # (length,) int32 token ids, (length,) bool target mask


def _tokenize(
    texts: list[str], targets: list[Spans], tokenizer, special: bool
) -> Iterator[tuple[list, list]]:
    """Token ids and a target mask per text; `special`: let the tokenizer add its BOS/CLS tokens."""
    for start in range(0, len(texts), 1000):
        batch, spans = texts[start : start + 1000], targets[start : start + 1000]
        try:
            out = tokenizer(batch, add_special_tokens=special, return_offsets_mapping=True)
        except NotImplementedError:  # a Python tokenizer has no offsets
            yield from (
                _tokenize_pieces(text, s, tokenizer, special) for text, s in zip(batch, spans, strict=True)
            )
            continue
        for ids, offsets, s in zip(out["input_ids"], out["offset_mapping"], spans, strict=True):
            yield list(ids), _overlaps(offsets, s)


def _overlaps(offsets: list[tuple[int, int]], spans: Spans) -> list[bool]:
    """Per token: do its characters overlap a target span? Added tokens (BOS...) have no characters."""
    if not spans or not offsets:
        return [False] * len(offsets)
    token = np.asarray(offsets).reshape(-1, 2)  # (tokens, 2)
    target = np.asarray(spans).reshape(-1, 2)  # (spans, 2)
    # (tokens, 1) vs (spans,) -> (tokens, spans): token begin < span end and token end > span start
    hit = (token[:, :1] < target[:, 1]) & (token[:, 1:] > target[:, 0])
    return (hit.any(axis=1) & (token[:, 1] > token[:, 0])).tolist()


def _tokenize_pieces(text: str, spans: Spans, tokenizer, special: bool) -> tuple[list[int], list[bool]]:
    """Without offsets: tokenize the target and non-target pieces apart and concatenate them."""
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    ids, mask = [], []
    for a, b in zip(cuts, cuts[1:], strict=False):
        piece = tokenizer.encode(text[a:b], add_special_tokens=False)
        ids += piece
        mask += [any(x <= a and b <= y for x, y in spans)] * len(piece)
    if special:  # where the tokenizer puts its special tokens around one sequence
        wrapped = tokenizer.build_inputs_with_special_tokens([-1])
        k = wrapped.index(-1)
        ids = wrapped[:k] + ids + wrapped[k + 1 :]
        mask = [False] * k + mask + [False] * (len(wrapped) - k - 1)
    return ids, mask


def _example(ids: list[int], mask: list[bool]) -> Example:
    return torch.tensor(ids, dtype=torch.int32), torch.tensor(mask, dtype=torch.bool)


def finish_example(
    ids: list[int], mask: list[bool], data: DataSection, eos: int | None
) -> tuple[Example | None, bool]:
    """Cut to max_length -> (the example, or None when no target is left to learn; whether it was cut). With
    packing, an EOS separator (not a target) ends an example that does not end in one."""
    truncated = len(ids) > data.max_length
    ids, mask = ids[: data.max_length], mask[: data.max_length]
    if not any(mask[1:]):  # the first token is never predicted
        return None, truncated
    if data.packing and eos is not None and ids[-1] != eos:
        ids, mask = ids + [eos], mask + [False]
    return _example(ids, mask), truncated


def causal_examples(
    texts: list[str], spans: list[Spans], data: DataSection, tokenizer, templated: bool
) -> tuple[list[Example | None], int]:
    """End with EOS, truncate -> (an example per text, None where nothing is left to learn; the number cut).

    `templated`: the chat template wrote the texts' BOS and end-of-turn tokens; other text gets the
    tokenizer's special tokens, then EOS."""
    eos = tokenizer.eos_token_id
    examples, cut = [], []
    for ids, mask in _tokenize(texts, spans, tokenizer, special=not templated):
        if not templated and eos is not None:
            if ids and ids[-1] == eos:  # the tokenizer added it: still a target
                mask[-1] = True
            else:
                ids, mask = ids + [eos], mask + [True]
        example, truncated = finish_example(ids, mask, data, eos)
        examples.append(example)
        cut.append(truncated)
    return examples, cut


def segment_examples(
    rows: list[list[tuple[str, bool]]], data: DataSection, tokenizer
) -> tuple[list[Example | None], int]:
    """Each row's pieces tokenized apart (no special tokens) and joined; a piece's tokens are targets when it
    is marked trained -> (an example per row or None, the number cut)."""
    texts = [text for pieces in rows for text, _ in pieces]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    examples, num_truncated = [], 0
    for pieces in rows:
        ids, mask = [], []
        for _, trained in pieces:
            piece = next(encoded)
            ids += piece
            mask += [trained] * len(piece)
        example, truncated = finish_example(ids, mask, data, tokenizer.eos_token_id)
        examples.append(example)
        num_truncated += truncated
    return examples, num_truncated


def token_examples(rows: list[dict], data: DataSection, tokenizer) -> tuple[list[Example | None], int]:
    """Pre-tokenized rows as they are: every token a target, or those whose label is not -100."""
    examples, num_truncated = [], 0
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        mask = [True] * len(ids) if labels is None else [label != IGNORE_INDEX for label in labels]
        example, truncated = finish_example(ids, mask, data, tokenizer.eos_token_id)
        examples.append(example)
        num_truncated += truncated
    return examples, num_truncated


def classification_examples(texts: list[str], data: DataSection, tokenizer) -> tuple[list[Example], int]:
    """Tokenize with the special tokens, cut to max_length; no token is a target (the class id is the
    label). -> (examples, number truncated)"""
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    long = [i for i, ids in enumerate(encoded) if len(ids) > data.max_length]
    if long:  # re-tokenized with truncation, so the [SEP] / EOS the tokenizer adds stays at the end
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=data.max_length)["input_ids"]
        for i, ids in zip(long, cut, strict=True):
            encoded[i] = ids
    return [_example(ids, [False] * len(ids)) for ids in encoded], len(long)


def pack(input_ids: Tensor, loss_mask: Tensor, max_length: int) -> tuple[Tensor, Tensor, list[int]]:
    """Cut the stream of examples into max_length rows (the last may be shorter); a row with no target
    (possible where a long prompt fills it) is dropped. -> (ids, mask, row lengths)"""
    rows = [(s, min(s + max_length, len(input_ids))) for s in range(0, len(input_ids), max_length)]
    rows = [(s, e) for s, e in rows if loss_mask[s + 1 : e].any()] or rows
    ids = torch.cat([input_ids[s:e] for s, e in rows])
    return ids, torch.cat([loss_mask[s:e] for s, e in rows]), [e - s for s, e in rows]
