"""Datasets -> tokenized, masked examples, once per data and tokenizer.

`prepare_data` runs the pipeline and caches what it makes:

    load the source (a .json/.jsonl/.csv/.parquet file, a `save_to_disk` dir, or a hub dataset name),
    the columns the format reads (data.columns, or found: sharegpt's `conversations`)
    -> hold out validation rows (a seeded fraction) or load a validation source
    -> read and check each row (rows.py), render it as text plus the character spans that are targets
    -> tokenize with offsets: a token is a target when it overlaps a target span
    -> truncate to max_length, drop rows left with nothing to learn, optionally pack
    -> save one safetensors file keyed on the data's bytes, the tokenizer and the settings.

Sources live in sources.py, what a row holds in rows.py, rendering in render.py, tokenizing, truncation and
packing in tokenize.py, each format's examples in examples.py, the cache in cache.py, the stored examples
and their batches in batches.py; this module joins them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peftcli.data import cache, examples
from peftcli.data.batches import TokenizedDataset
from peftcli.data.render import probe_pair
from peftcli.data.rows import read_row, resolve_columns, short
from peftcli.data.sources import DataSource, Table
from peftcli.data.tokenize import pack
from peftcli.errors import UserError

log = logging.getLogger(__name__)

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
            text = f"{name}: {split.num_examples:,} {'pairs' if split.rows_per_example == 2 else 'examples'}"
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


def _label_key(value, class_names: list[str] | None, where: str) -> str | int:
    if class_names is not None and isinstance(value, int) and 0 <= value < len(class_names):
        return class_names[value]
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int)) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    raise UserError(f"{where}: a label must be a string or an integer, got {short(value)}")


def _label_names(table: Table, column: str, source: DataSource) -> list[str]:
    """Class names in id order: a ClassLabel's own order, else the sorted distinct values."""
    if column in table.class_names:
        return list(table.class_names[column])
    where = f"{source.where}: column `{column}`"
    keys = {
        _label_key(row[column], None, f"{source.where}: {table.unit} {n}: column `{column}`")
        for n, row in zip(table.numbers, table.rows, strict=True)
    }
    if len({type(k) for k in keys}) > 1:
        raise UserError(f"{where} mixes string and integer labels")
    names = [str(k) for k in sorted(keys)]
    if len(names) < 2:
        raise UserError(
            f"{where}: every row has the label `{names[0] if names else ''}`; a classifier needs two or more"
        )
    return names


def _build(
    table: Table,
    columns: dict[str, str],
    source: DataSource,
    data: DataSection,
    tokenizer,
    label_names: list[str] | None,
) -> TokenizedDataset:
    """Read, render, tokenize, truncate, drop and pack one split."""
    rows = [
        (where, read_row(row, columns, data, where))
        for n, row in zip(table.numbers, table.rows, strict=True)
        for where in [f"{source.where}: {table.unit} {n}"]
    ]
    class_ids, desirable, rows_per_example = None, None, 1
    if data.format in ("preference", "kto"):
        made, num_truncated = examples.paired(rows, data, tokenizer)
        if data.format == "kto":
            desirable = [row["label"] for (_, row), pair in zip(rows, made, strict=True) if pair is not None]
        kept = [pair for pair in made if pair is not None]
        rows_per_example, flat = 2, [example for pair in kept for example in pair]
    else:
        if label_names is not None:
            class_names, column = table.class_names.get(columns["label"]), columns["label"]
            label_ids = {name: i for i, name in enumerate(label_names)}

            def label_id(value, where: str) -> int:
                key = str(_label_key(value, class_names, f"{where}: column `{column}`"))
                if key not in label_ids:
                    raise UserError(
                        f"{where}: column `{column}`: label `{key}` never appears in the training data; "
                        f"training labels: {', '.join(label_names)}"
                    )
                return label_ids[key]

            made, class_ids, num_truncated = examples.classification(rows, data, tokenizer, label_id)
        else:
            made, num_truncated = examples.causal(rows, data, tokenizer)
        kept = flat = [example for example in made if example is not None]
    if not kept:
        hint = f"; {num_truncated} were cut at max_length={data.max_length}" if num_truncated else ""
        raise UserError(
            f"{source.where}: all {len(rows)} rows are empty after tokenization: none has "
            f"anything to learn{hint}"
        )
    input_ids, loss_mask = torch.cat([ids for ids, _ in flat]), torch.cat([mask for _, mask in flat])
    lengths = [len(ids) for ids, _ in flat]
    if data.packing:
        input_ids, loss_mask, lengths = pack(input_ids, loss_mask, data.max_length)
    return TokenizedDataset(
        input_ids,
        loss_mask,
        offsets=torch.tensor([0, *lengths]).cumsum(0),
        class_labels=torch.tensor(class_ids, dtype=torch.long) if class_ids is not None else None,
        num_examples=len(kept),
        num_truncated=num_truncated,
        num_dropped=len(rows) - len(kept),
        rows_per_example=rows_per_example,
        desirable=torch.tensor(desirable, dtype=torch.bool) if desirable is not None else None,
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
    if data.format in ("classification", "kto", "tokenized", "segments") or data.validation is None:
        return None
    source = data.train_source if isinstance(data.validation, float) else data.validation_source
    columns = resolve_columns(data, source.columns(), source.where)
    table = source.read(list(columns.values()))
    if isinstance(data.validation, float):
        table = table.select(_held_out(len(table), data, seed)[1])
    for number, row in zip(table.numbers, table.rows, strict=True):
        pair = probe_pair(read_row(row, columns, data, f"{source.where}: {table.unit} {number}"), data.format)
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
    if data.packing and data.format in ("classification", "preference", "kto"):
        raise UserError(f"data.packing: packs causal-lm examples only, not {data.format} data")
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

    columns = resolve_columns(data, train_source.columns(), train_source.where)
    table = train_source.read(list(columns.values()))
    # With a held-out fraction the label set is the whole source's, so a rare class that lands only
    # in the held-out rows still gets an id.
    label_names = _label_names(table, columns["label"], train_source) if classification else None
    parts = [(table, columns, train_source)]
    if held_out:
        parts = [(table.select(rows), columns, train_source) for rows in _held_out(len(table), data, seed)]
    elif val_source is not None:
        val_columns = resolve_columns(data, val_source.columns(), val_source.where)
        parts.append((val_source.read(list(val_columns.values())), val_columns, val_source))
    built = [_build(t, c, source, data, tokenizer, label_names) for t, c, source in parts]
    splits = dict(zip(("train", "validation"), built, strict=False))
    try:
        cache.save(path, splits, label_names)
    except (OSError, UserError) as e:  # a cache is a convenience: the run goes on without one
        log.warning("the tokenized data was not cached (%s): the next run tokenizes it again", e)
    return PreparedData(splits["train"], splits.get("validation"), label_names, pad_id, False, path)
