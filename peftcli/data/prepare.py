"""Datasets -> tokenized, masked examples, once per data and tokenizer.

`prepare_data` runs the pipeline and caches what it makes:

    load the source (a .json/.jsonl/.csv/.parquet file, a `save_to_disk` dir, or a hub dataset name)
    -> hold out validation rows (a seeded fraction) or load a validation source
    -> render each row as text plus the character spans that are targets (by data.format)
    -> tokenize with offsets: a token is a target when it overlaps a target span
    -> truncate to max_length, drop rows left with nothing to learn, optionally pack
    -> save one safetensors file keyed on the data's bytes, the tokenizer and the settings.

Sources live in sources.py, rendering in render.py, tokenizing, truncation and packing in tokenize.py,
the cache in cache.py, the stored examples and their batches in batches.py; this module joins them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import torch

from peftcli.data import cache
from peftcli.data.batches import TokenizedDataset
from peftcli.data.render import FORMAT_COLUMNS, as_text, probe_pair, render_row, short
from peftcli.data.sources import DataSource, check_columns
from peftcli.data.tokenize import causal_examples, classification_examples, pack
from peftcli.errors import UserError

if TYPE_CHECKING:
    from peftcli.recipe import DataSection


@dataclass
class PreparedData:
    train: TokenizedDataset
    validation: TokenizedDataset | None
    label_names: list[str] | None  # classification: class id -> name, saved with the adapter
    pad_id: int  # for collate: the tokenizer's pad token, else EOS, else 0 (always masked out)
    cache_hit: bool
    cache_path: Path

    @property
    def num_examples(self) -> int:
        return self.train.num_examples

    @property
    def num_truncated(self) -> int:
        return self.train.num_truncated

    def describe(self) -> str:
        """One log line: what was made, what was cut or skipped, and whether it came from the cache."""
        parts = []
        for name, split in (("train", self.train), ("validation", self.validation)):
            if split is None:
                continue
            text = f"{name}: {split.num_examples:,} examples"
            if len(split) != split.num_examples:
                text += f" packed in {len(split):,} rows"
            if split.num_truncated:
                text += f", {split.num_truncated:,} cut to max_length"
            if split.num_dropped:
                text += f", {split.num_dropped:,} skipped with nothing to learn"
            parts.append(text)
        parts.append(
            "tokenized data from cache" if self.cache_hit else f"tokenized, cached in {self.cache_path}"
        )
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Building a split


def _rows(dataset: datasets.Dataset, columns: list[str], numbers: list[int]) -> Iterator[tuple[int, dict]]:
    """(1-based row number in the source, {column: value}) for the selected columns."""
    numbers_iter = iter(numbers)
    for batch in dataset.select_columns(columns).iter(batch_size=1000):
        for values in zip(*(batch[c] for c in columns), strict=True):
            yield next(numbers_iter), dict(zip(columns, values, strict=True))


def _label_key(value, feature, where: str) -> str | int:
    if isinstance(feature, datasets.ClassLabel) and isinstance(value, int) and value >= 0:
        return feature.int2str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int)) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    raise UserError(f"{where}: a label must be a string or an integer, got {short(value)}")


def _label_names(dataset: datasets.Dataset, data: DataSection, source: DataSource) -> list[str]:
    """Class names in id order: a ClassLabel's own order, else the sorted distinct values."""
    feature = dataset.features[data.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    where = f"{source.where}: column `{data.label_column}`"
    keys = {_label_key(v, feature, f"{where}, row {n}") for n, v in enumerate(dataset[data.label_column], 1)}
    if len({type(k) for k in keys}) > 1:
        raise UserError(f"{where} mixes string and integer labels")
    return [str(k) for k in sorted(keys)]


def _build(
    dataset: datasets.Dataset,
    numbers: list[int],
    source: DataSource,
    data: DataSection,
    tokenizer,
    label_names: list[str] | None,
) -> TokenizedDataset:
    """Render, tokenize, truncate, drop and pack one split; `numbers` are its rows' numbers in the source."""
    columns = [getattr(data, f) for f in FORMAT_COLUMNS[data.format]]
    if data.format == "instruction" and data.input_column in dataset.column_names:
        columns.append(data.input_column)
    label_ids = {name: i for i, name in enumerate(label_names or [])}
    texts, spans, class_ids = [], [], []
    feature = dataset.features[data.label_column] if label_names is not None else None
    for number, row in _rows(dataset, columns, numbers):
        where = f"{source.where}: row {number}"
        if label_names is None:
            rendered = render_row(row, data, tokenizer, where)
            if rendered is not None:
                texts.append(rendered[0])
                spans.append(rendered[1])
            continue
        key = str(_label_key(row[data.label_column], feature, f"{where}: column `{data.label_column}`"))
        if key not in label_ids:
            raise UserError(
                f"{source.where}: label `{key}` (row {number}) never appears in the training data; "
                f"training labels: {', '.join(label_names)}"
            )
        text = as_text(row[data.text_column])
        if text.strip():
            texts.append(text)
            class_ids.append(label_ids[key])
    if label_names is None:
        examples, num_truncated = causal_examples(texts, spans, data, tokenizer)
    else:
        examples, num_truncated = classification_examples(texts, data, tokenizer)
    if not examples:
        hint = f"; {num_truncated} were cut at max_length={data.max_length}" if num_truncated else ""
        raise UserError(
            f"{source.where}: all {len(numbers)} rows are empty after tokenization: none has "
            f"anything to learn{hint}"
        )
    input_ids, loss_mask = torch.cat([ids for ids, _ in examples]), torch.cat([mask for _, mask in examples])
    lengths = [len(ids) for ids, _ in examples]
    if data.packing:
        input_ids, loss_mask, lengths = pack(input_ids, loss_mask, data.max_length)
    return TokenizedDataset(
        input_ids,
        loss_mask,
        offsets=torch.tensor([0, *lengths]).cumsum(0),
        class_labels=torch.tensor(class_ids, dtype=torch.long) if label_names is not None else None,
        num_examples=len(examples),
        num_truncated=num_truncated,
        num_dropped=len(numbers) - len(examples),
    )


def _cache_key(data: DataSection, tokenizer, task: str, seed: int) -> str:
    """What the tokenized data depends on: the data's bytes, the settings, the tokenizer, and the seed
    where it picks the held-out rows."""
    val_source = data.validation_source
    parts = {
        "version": cache.CACHE_VERSION,
        "task": task,
        "settings": {k: v for k, v in asdict(data).items() if k not in ("train", "validation")},
        "train": data.train_source.fingerprint(),
        "validation": val_source.fingerprint() if val_source else data.validation,
        "seed": seed if isinstance(data.validation, float) else None,
        "tokenizer": cache.tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _held_out(num_rows: int, data: DataSection, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, validation rows), 0-based: a fraction data.validation of the rows, picked with the
    seed."""
    held = max(1, round(num_rows * data.validation))
    if held >= num_rows:
        raise UserError(
            f"{data.train_source.where}: {num_rows} rows are too few to hold out "
            f"data.validation={data.validation}; add rows or set data.validation: null"
        )
    picked = set(random.Random(seed).sample(range(num_rows), held))
    return [i for i in range(num_rows) if i not in picked], sorted(picked)


def probe_example(data: DataSection, seed: int) -> tuple[str, str] | None:
    """(prompt, reference answer) of the first validation row that has both (render.probe_pair), for a
    look at what a trained model answers; None without validation data or for classification."""
    if data.format == "classification" or data.validation is None:
        return None
    if isinstance(data.validation, float):
        dataset = data.train_source.load()
        dataset = dataset.select(_held_out(len(dataset), data, seed)[1], keep_in_memory=True)
    else:
        dataset = data.validation_source.load()
    columns = [
        c for c in dataset.column_names if c in {getattr(data, f) for f in FORMAT_COLUMNS[data.format]}
    ]
    if data.format == "instruction" and data.input_column in dataset.column_names:
        columns.append(data.input_column)
    for number, row in _rows(dataset, columns, list(range(1, len(dataset) + 1))):
        pair = probe_pair(row, data, f"validation row {number}")
        if pair is not None:
            return pair
    return None


def prepare_data(
    data: DataSection, tokenizer, task: str, seed: int, cache_dir: str | Path | None = None
) -> PreparedData:
    """Load, split, render, tokenize, mask and maybe pack the recipe's data, or read it from the cache.

    task: "causal-lm" or "sequence-classification" (classification data). seed: train.seed, which
    picks the held-out validation rows. cache_dir: default `cache.default_cache_dir()`. Raises UserError on
    any fault in the data, naming the source and the column, row or label.
    """
    classification = data.format == "classification"
    if classification != (task == "sequence-classification"):
        raise UserError(f"data.format: {data.format!r} data does not fit model.task {task!r}")
    if classification and data.packing:
        raise UserError("data.packing: packs causal-lm examples only, not classification data")
    if data.format == "chat" and not tokenizer.chat_template:
        raise UserError("data.format: chat needs a tokenizer with a chat template; this one has none")
    train_source, val_source = data.train_source, data.validation_source
    held_out = isinstance(data.validation, float)
    path = Path(cache_dir).expanduser() if cache_dir is not None else cache.default_cache_dir()
    path = path / f"{_cache_key(data, tokenizer, task, seed)}.safetensors"
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    cached = cache.load(path)
    if cached is not None:
        splits, label_names = cached
        return PreparedData(splits["train"], splits.get("validation"), label_names, pad_id, True, path)

    dataset = train_source.load()
    check_columns(train_source, dataset.column_names, data)
    # With a held-out fraction the label set is the whole source's, so a rare class that lands only
    # in the held-out rows still gets an id.
    label_names = _label_names(dataset, data, train_source) if classification else None
    parts = [(dataset, list(range(1, len(dataset) + 1)), train_source)]
    if held_out:
        parts = [
            (dataset.select(rows, keep_in_memory=True), [i + 1 for i in rows], train_source)
            for rows in _held_out(len(dataset), data, seed)
        ]
    elif val_source is not None:
        validation = val_source.load()
        check_columns(val_source, validation.column_names, data)
        parts.append((validation, list(range(1, len(validation) + 1)), val_source))
    built = [_build(ds, numbers, source, data, tokenizer, label_names) for ds, numbers, source in parts]
    splits = dict(zip(("train", "validation"), built, strict=False))
    cache.save(path, splits, label_names)
    return PreparedData(splits["train"], splits.get("validation"), label_names, pad_id, False, path)
