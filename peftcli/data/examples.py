"""One split's rows (as data/rows.py reads them) -> tokenized examples, by data.format.

Causal-LM formats give one example per row; classification one per row with its class id; preference
pairs two (chosen, rejected) and KTO rows two (the answer, and the same prompt with the answer of the row
before it: the mismatched pair whose log-ratio estimates KTO's reference point, fixed here so that its
reference log-probs can be cached). A row with nothing left to learn gives None; a pair or KTO example is
dropped whole when either of its rows has nothing left.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftcli.data.render import render_answer, render_row, uses_template
from peftcli.data.tokenize import (
    Example,
    causal_examples,
    classification_examples,
    segment_examples,
    token_examples,
)
from peftcli.errors import UserError

if TYPE_CHECKING:
    from peftcli.recipe import DataSection

Numbered = list[tuple[str, dict]]  # (where the row is, e.g. "data.train: d.jsonl: line 8", its values)


def causal(rows: Numbered, data: DataSection, tokenizer) -> tuple[list[Example | None], int]:
    """text, instruction, chat, segments or tokenized rows -> (an example or None per row, the number cut)."""
    if data.format == "segments":
        return segment_examples([row["segments"] for _, row in rows], data, tokenizer)
    if data.format == "tokenized":
        for where, row in rows:
            _check_vocabulary(row, tokenizer, where)
        return token_examples([row for _, row in rows], data, tokenizer)
    rendered = [render_row(row, data, tokenizer, where) for where, row in rows]
    kept = [i for i, r in enumerate(rendered) if r is not None]
    made, cut = causal_examples(
        [rendered[i][0] for i in kept],
        [rendered[i][1] for i in kept],
        data,
        tokenizer,
        templated=uses_template(data, tokenizer),
    )
    examples: list[Example | None] = [None] * len(rows)
    for i, example in zip(kept, made, strict=True):
        examples[i] = example
    return examples, sum(cut)


def _check_vocabulary(row: dict, tokenizer, where: str) -> None:
    size = len(tokenizer)
    bad = next((t for t in row["input_ids"] if t >= size), None)
    if bad is not None:
        raise UserError(f"{where}: token id {bad} is not in the tokenizer's vocabulary (ids 0..{size - 1})")


def classification(
    rows: Numbered, data: DataSection, tokenizer, label_id
) -> tuple[list[Example | None], list[int], int]:
    """-> (an example or None per row, the kept rows' class ids, the number cut); `label_id(value, where)` is
    a row's class id (prepare.py knows the label set)."""
    texts, class_ids, kept = [], [], []
    for i, (where, row) in enumerate(rows):
        class_id = label_id(row["label"], where)
        if row["text"].strip():
            texts.append(row["text"])
            class_ids.append(class_id)
            kept.append(i)
    made, num_truncated = classification_examples(texts, data, tokenizer)
    examples: list[Example | None] = [None] * len(rows)
    for i, example in zip(kept, made, strict=True):
        examples[i] = example
    return examples, class_ids, num_truncated


def paired(rows: Numbered, data: DataSection, tokenizer) -> tuple[list[tuple[Example, Example] | None], int]:
    """Preference rows -> (chosen, rejected); KTO rows -> (answer, KL answer). None where either row has
    nothing left to learn. -> (one per row, the number of rows with either row cut)."""
    if data.format == "preference":
        answers = [(row["prompt"], row[k]) for _, row in rows for k in ("chosen", "rejected")]
    else:
        completions = [row["completion"] for _, row in rows]
        before = completions[-1:] + completions[:-1]  # row i's KL answer: row i - 1's
        answers = [
            (row["prompt"], a)
            for (_, row), b in zip(rows, before, strict=True)
            for a in (row["completion"], b)
        ]
    wheres = [where for where, _ in rows for _ in (0, 1)]
    rendered = [render_answer(p, a, tokenizer, where) for (p, a), where in zip(answers, wheres, strict=True)]
    made, cut = causal_examples(
        [text for text, _ in rendered],
        [spans for _, spans in rendered],
        data,
        tokenizer,
        templated=uses_template(data, tokenizer),
    )
    num_truncated = sum(a or b for a, b in zip(cut[0::2], cut[1::2], strict=True))
    pairs = [
        (first, second) if first is not None and second is not None else None
        for first, second in zip(made[0::2], made[1::2], strict=True)
    ]
    return pairs, num_truncated
