"""Datasets -> tokenized, masked examples -> padded batches.

`prepare_data` runs the pipeline once and caches what it makes:

    load the source (a .json/.jsonl/.csv/.parquet file, a `save_to_disk` dir, or a hub dataset name)
    -> hold out validation rows (a seeded fraction) or load a validation source
    -> render each row as text plus the character spans that are targets (by data.format)
    -> tokenize with offsets: a token is a target when it overlaps a target span
    -> truncate to max_length, drop rows left with nothing to learn, optionally pack
    -> save one safetensors file keyed on the data's bytes, the tokenizer and the settings.

Labels follow transformers: the model shifts them itself, and -100 marks a token that is not a target.

Packing concatenates the examples (each ending in EOS) and cuts the stream into max_length rows. Attention
is NOT blocked between examples that share a row: a token may attend to the end of the example before it.
This is plain GPT-style packing; the EOS separators mark where an example ends, and attending to an
unrelated example costs little. Labels keep their masks, so packed prompts stay untrained.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from peftcli.errors import UserError, did_you_mean
from peftcli.fileio import atomic_write
from peftcli.recipe import DataSection

IGNORE_INDEX = -100  # transformers' cross-entropy ignore_index: not a target
CACHE_VERSION = 1  # bump when the rendering or the stored layout changes
FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
VALIDATION_SPLITS = ("validation", "valid", "dev", "test")  # tried in order in a DatasetDict
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"  # without a chat template
PLAIN_INPUT = "### Input:\n{input}\n\n"
# The DataSection fields naming the columns each format needs (input_column is optional).
FORMAT_COLUMNS = {
    "text": ("text_column",),
    "instruction": ("instruction_column", "output_column"),
    "chat": ("messages_column",),
    "classification": ("text_column", "label_column"),
}

Spans = list[tuple[int, int]]  # [start, end) character ranges of target text


@dataclass(eq=False)
class TokenizedDataset(torch.utils.data.Dataset):
    """Rows of token ids stored back to back; `dataset[i]` is a dict of lists ready for `collate`."""

    input_ids: Tensor  # (total_tokens,) int32
    loss_mask: Tensor  # (total_tokens,) bool: True on target tokens
    offsets: Tensor  # (rows + 1,) int64: row i is input_ids[offsets[i] : offsets[i + 1]]
    class_labels: Tensor | None  # (rows,) int64 class ids for classification, else None
    num_examples: int  # examples kept (before packing)
    num_truncated: int  # examples cut to max_length
    num_dropped: int  # rows with nothing to learn: empty, or every target cut off

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, list[int] | int]:
        start, end = self.offsets[index].item(), self.offsets[index + 1].item()
        ids = self.input_ids[start:end].long()
        if self.class_labels is not None:
            labels = self.class_labels[index].item()
        else:
            labels = torch.where(self.loss_mask[start:end], ids, IGNORE_INDEX).tolist()
        return {"input_ids": ids.tolist(), "attention_mask": [1] * (end - start), "labels": labels}

    @property
    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()


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


def collate(batch: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch to its longest row -> input_ids, attention_mask, labels as (batch, seq) LongTensors.

    Padding gets pad_id, attention 0 and label -100. Classification rows carry one class id each, so
    their `labels` is a (batch,) LongTensor.
    """
    longest = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    classification = not isinstance(batch[0]["labels"], list)
    if classification:
        labels = torch.tensor([example["labels"] for example in batch], dtype=torch.long)
    else:
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.as_tensor(example["input_ids"])
        attention_mask[row, :length] = torch.as_tensor(example["attention_mask"])
        if not classification:
            labels[row, :length] = torch.as_tensor(example["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def default_cache_dir() -> Path:
    """$PEFTCLI_CACHE/data when PEFTCLI_CACHE is set, else ~/.cache/peftcli/data."""
    root = os.environ.get("PEFTCLI_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "peftcli") / "data"


# --------------------------------------------------------------------------------------------------
# Sources


class _Source:
    """A data source as the recipe names it, loaded lazily; `where` prefixes every message about it."""

    def __init__(self, name: str, key: str, splits: tuple[str, ...]):
        self.name, self.splits, self.where = name, splits, f"{key}: {name}"
        self.path = Path(name).expanduser()
        self.suffix = self.path.suffix.lower()
        self._dataset: datasets.Dataset | None = None
        if self.path.is_file():
            if self.suffix not in FILE_LOADERS:
                raise UserError(
                    f"{self.where}: unsupported file type `{self.path.suffix}`; use .json, .jsonl, "
                    ".csv, .parquet or a directory written by Dataset.save_to_disk"
                )
            self.kind = "file"
        elif self.path.is_dir():
            if not any((self.path / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
                raise UserError(f"{self.where}: a directory, but not one written by Dataset.save_to_disk")
            self.kind = "disk"
        elif name.startswith((".", "/", "~")) or self.suffix in FILE_LOADERS:
            raise UserError(f"{self.where}: file not found")
        else:
            self.kind = "hub"

    def fingerprint(self) -> str:
        if self.kind == "file":  # the bytes, so a cache hit needs no load at all
            digest = hashlib.sha256()
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            return f"file{self.suffix}:{digest.hexdigest()}"
        return f"{self.kind}:{self.load()._fingerprint}"

    def load(self) -> datasets.Dataset:
        if self._dataset is None:
            if self.kind == "file" and not self.peek()[1]:
                raise UserError(f"{self.where}: the dataset is empty")
            self._dataset = self._load()
            if len(self._dataset) == 0:
                raise UserError(f"{self.where}: the dataset is empty")
        return self._dataset

    def _load(self) -> datasets.Dataset:
        if self.kind == "file":
            try:
                with _quiet_datasets():
                    return datasets.load_dataset(
                        FILE_LOADERS[self.suffix], data_files=str(self.path), split="train"
                    )
            except Exception as e:  # the loaders raise many types for a malformed file
                raise UserError(f"{self.where}: could not read it as {self.suffix[1:]}: {e}") from e
        if self.kind == "disk":
            loaded = datasets.load_from_disk(str(self.path))
            if not isinstance(loaded, datasets.DatasetDict):
                return loaded
            split = next((s for s in self.splits if s in loaded), None)
            if split is None:
                raise UserError(
                    f"{self.where}: no split `{self.splits[0]}` (data.split); splits: "
                    + ", ".join(loaded)
                    + did_you_mean(self.splits[0], loaded)
                )
            return loaded[split]
        try:  # a hub dataset: standard datasets loading (and its download progress), cached by datasets
            return datasets.load_dataset(self.name, split=self.splits[0])
        except Exception as e:  # offline, missing, gated, unknown split...
            raise UserError(f"{self.where}: could not load split `{self.splits[0]}` from the hub: {e}") from e

    def peek(self, rows: int = 20) -> tuple[list[str], list[dict]]:
        """The column names and the first rows, read cheaply: a file is not loaded whole."""
        if self.kind != "file":
            dataset = self.load()
            return dataset.column_names, dataset.select(range(min(rows, len(dataset)))).to_list()
        if self.suffix == ".parquet":
            parquet = pq.ParquetFile(self.path)
            first = next(parquet.iter_batches(batch_size=rows), None)
            return parquet.schema_arrow.names, first.to_pylist() if first is not None else []
        if self.suffix == ".csv":
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                return list(reader.fieldnames or []), list(itertools.islice(reader, rows))
        found = self._peek_json(rows)
        return list(dict.fromkeys(key for row in found for key in row)), found

    def _peek_json(self, rows: int) -> list[dict]:
        """First rows of JSON Lines, or of one JSON array of objects: the two layouts datasets reads."""
        with open(self.path, encoding="utf-8") as f:
            try:
                if f.read(4096).lstrip().startswith("["):
                    f.seek(0)
                    found = json.load(f)[:rows]
                else:
                    f.seek(0)
                    found = [json.loads(line) for line in itertools.islice(filter(str.strip, f), rows)]
            except json.JSONDecodeError as e:
                raise UserError(f"{self.where}: not JSON or JSON Lines ({e})") from e
        for row in found:
            if not isinstance(row, dict):
                raise UserError(f"{self.where}: each row must be a JSON object, got {_short(row)}")
        return found


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars while a local file is converted: it takes a moment and the CLI logs its own lines."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _check_columns(source: _Source, columns: list[str], data: DataSection) -> None:
    for field in FORMAT_COLUMNS[data.format]:
        column = getattr(data, field)
        if column not in columns:
            raise UserError(
                f"{source.where}: no column `{column}` (data.{field}); its columns: "
                + ", ".join(columns)
                + did_you_mean(column, columns)
            )


def check_data_source(data: DataSection) -> None:
    """Refuse missing files, missing columns and malformed first rows before any model is loaded.

    Needs no tokenizer and reads only the first rows of a file. A hub dataset is not checked here:
    that would download it.
    """
    sources = [_Source(data.train, "data.train", (data.split,))]
    if isinstance(data.validation, str):
        sources.append(_Source(data.validation, "data.validation", VALIDATION_SPLITS))
    for source in sources:
        if source.kind == "hub":
            continue
        columns, rows = source.peek()
        if not rows:
            raise UserError(f"{source.where}: the dataset is empty")
        _check_columns(source, columns, data)
        if data.format == "chat":
            for number, row in enumerate(rows, 1):
                _messages(
                    row[data.messages_column],
                    f"{source.where}: row {number}: column `{data.messages_column}`",
                )


# --------------------------------------------------------------------------------------------------
# Rendering rows as text with target spans


def _text(value) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _messages(value, where: str) -> list[dict]:
    if not (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    ):
        raise UserError(f"{where}: expected a list of {{role, content}} messages, got {_short(value)}")
    # Rows read from JSON get every key any row has, as None where absent: drop those.
    return [{key: v for key, v in message.items() if v is not None} for message in value]


def _end_markers(tokenizer) -> list[str]:
    """Special-token strings that can close a turn (`<|im_end|>`, `</s>`, `<|eot_id|>`...), longest first."""
    markers = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    markers |= {tokenizer.eos_token} if tokenizer.eos_token else set()
    return sorted(markers, key=len, reverse=True)


def _target_end(full: str, start: int, stop: int, answer: str, markers: list[str], limit: int) -> int:
    """Where an answer's target span ends: through the end-of-turn token right after the answer (the
    model must learn to stop), not the newline the template writes after it."""
    found = full.find(answer, start, stop) if answer else -1
    tail = found + len(answer) if found >= 0 else start
    tail += len(full[tail:limit]) - len(full[tail:limit].lstrip())
    for marker in markers:
        if full.startswith(marker, tail) and tail + len(marker) <= limit:
            return tail + len(marker)
    return start + len(full[start:stop].rstrip())


def _kept_suffix(full: str, answer: str, cursor: int) -> str:
    """The longest end of `answer` that `full` holds after `cursor`, starting at the answer's start, a
    space or a `>`: what a template keeps of an answer when it drops the reasoning before it."""
    low, high = 0, len(answer)  # a suffix found implies every shorter one is: binary search its start
    while low < high:
        middle = (low + high) // 2
        if full.find(answer[middle:], cursor) >= 0:
            high = middle
        else:
            low = middle + 1
    while low < len(answer) and low > 0 and not (answer[low - 1].isspace() or answer[low - 1] == ">"):
        low += 1
    return answer[low:].strip()


def _render_chat(messages: list[dict], tokenizer, train_on_inputs: bool, where: str) -> tuple[str, Spans]:
    """Render through the chat template; the targets are the assistant turns.

    A turn's span is found by rendering the conversation up to it: messages[:i] with the generation
    prompt ends where the answer starts, messages[:i + 1] ends after it. Where a template renders a
    turn differently once later turns follow (some drop earlier answers' reasoning), what it kept of the
    answer is searched for instead.
    """

    def render(turns: list[dict], prompt: bool) -> str | None:
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)
        except Exception:  # a prefix the template refuses (e.g. not starting with a user turn)
            return None

    try:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja errors, or raise_exception() in the template
        raise UserError(f"{where}: the tokenizer's chat template refused these messages: {e}") from e
    if train_on_inputs:
        return full, [(0, len(full))]
    markers, spans, cursor = _end_markers(tokenizer), [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        answer = message["content"].strip()
        before = render(messages[:i], True) if i else None
        after = render(messages[: i + 1], False)
        if (
            before is not None
            and after is not None
            and full.startswith(after)
            and after.startswith(before)
            and len(before) >= cursor
        ):
            start, stop, limit = len(before), len(after), len(after)
        else:
            kept = _kept_suffix(full, answer, cursor)
            if not kept:
                continue
            start = full.find(kept, cursor)
            stop, limit = start + len(kept), len(full)
            answer = kept
        cursor = _target_end(full, start, stop, answer, markers, limit)
        spans.append((start, cursor))
    return full, spans


def _render(row: dict, data: DataSection, tokenizer, where: str) -> tuple[str, Spans] | None:
    """A row -> (text, target spans), or None when it has nothing to learn."""
    if data.format == "text":
        text = _text(row[data.text_column])
        return (text, [(0, len(text))]) if text.strip() else None
    if data.format == "chat":
        messages = _messages(row[data.messages_column], f"{where}: column `{data.messages_column}`")
        return _render_chat(messages, tokenizer, data.train_on_inputs, where)
    instruction, extra = _text(row[data.instruction_column]), _text(row.get(data.input_column)).strip()
    output = _text(row[data.output_column])
    if not output.strip():
        return None
    if tokenizer.chat_template:
        user = f"{instruction}\n\n{extra}" if extra else instruction
        chat = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return _render_chat(chat, tokenizer, data.train_on_inputs, where)
    prompt = PLAIN_PROMPT.format(
        instruction=instruction, input=PLAIN_INPUT.format(input=extra) if extra else ""
    )
    return prompt + output, [(0 if data.train_on_inputs else len(prompt), len(prompt) + len(output))]


# --------------------------------------------------------------------------------------------------
# Tokenizing and building a split

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


def _causal_examples(
    texts: list[str], spans: list[Spans], data: DataSection, tokenizer
) -> tuple[list[Example], int]:
    """End with EOS, truncate, keep what has a target to learn -> (examples, number truncated)."""
    # A chat template writes its own BOS and end-of-turn tokens; other text gets the tokenizer's, then EOS.
    templated = data.format == "chat" or (data.format == "instruction" and bool(tokenizer.chat_template))
    eos = tokenizer.eos_token_id
    examples, num_truncated = [], 0
    for ids, mask in _tokenize(texts, spans, tokenizer, special=not templated):
        if not templated and eos is not None:
            if ids and ids[-1] == eos:  # the tokenizer added it: still a target
                mask[-1] = True
            else:
                ids, mask = ids + [eos], mask + [True]
        if len(ids) > data.max_length:
            num_truncated += 1
            ids, mask = ids[: data.max_length], mask[: data.max_length]
        if not any(mask[1:]):  # the first token is never predicted
            continue
        if data.packing and eos is not None and ids[-1] != eos:  # a separator, not a target
            ids, mask = ids + [eos], mask + [False]
        examples.append(_example(ids, mask))
    return examples, num_truncated


def _classification_examples(texts: list[str], data: DataSection, tokenizer) -> tuple[list[Example], int]:
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    long = [i for i, ids in enumerate(encoded) if len(ids) > data.max_length]
    if long:  # re-tokenized with truncation, so the [SEP] / EOS the tokenizer adds stays at the end
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=data.max_length)["input_ids"]
        for i, ids in zip(long, cut, strict=True):
            encoded[i] = ids
    return [_example(ids, [False] * len(ids)) for ids in encoded], len(long)


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
    raise UserError(f"{where}: a label must be a string or an integer, got {_short(value)}")


def _label_names(dataset: datasets.Dataset, data: DataSection, source: _Source) -> list[str]:
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
    source: _Source,
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
    for number, row in _rows(dataset, columns, numbers):
        where = f"{source.where}: row {number}"
        if label_names is None:
            rendered = _render(row, data, tokenizer, where)
            if rendered is not None:
                texts.append(rendered[0])
                spans.append(rendered[1])
            continue
        feature = dataset.features[data.label_column]
        key = str(_label_key(row[data.label_column], feature, f"{where}: column `{data.label_column}`"))
        if key not in label_ids:
            raise UserError(
                f"{source.where}: label `{key}` (row {number}) never appears in the training data; "
                f"training labels: {', '.join(label_names)}"
            )
        if _text(row[data.text_column]).strip():
            texts.append(_text(row[data.text_column]))
            class_ids.append(label_ids[key])
    if label_names is None:
        examples, num_truncated = _causal_examples(texts, spans, data, tokenizer)
    else:
        examples, num_truncated = _classification_examples(texts, data, tokenizer)
    if not examples:
        hint = f"; {num_truncated} were cut at max_length={data.max_length}" if num_truncated else ""
        raise UserError(
            f"{source.where}: all {len(numbers)} rows are empty after tokenization: none has "
            f"anything to learn{hint}"
        )
    input_ids, loss_mask = torch.cat([ids for ids, _ in examples]), torch.cat([mask for _, mask in examples])
    lengths = [len(ids) for ids, _ in examples]
    if data.packing:
        input_ids, loss_mask, lengths = _pack(input_ids, loss_mask, data.max_length)
    return TokenizedDataset(
        input_ids,
        loss_mask,
        offsets=torch.tensor([0, *lengths]).cumsum(0),
        class_labels=torch.tensor(class_ids, dtype=torch.long) if label_names is not None else None,
        num_examples=len(examples),
        num_truncated=num_truncated,
        num_dropped=len(numbers) - len(examples),
    )


def _pack(input_ids: Tensor, loss_mask: Tensor, max_length: int) -> tuple[Tensor, Tensor, list[int]]:
    """Cut the stream of examples into max_length rows (the last may be shorter); a row with no target
    (possible where a long prompt fills it) is dropped. -> (ids, mask, row lengths)"""
    rows = [(s, min(s + max_length, len(input_ids))) for s in range(0, len(input_ids), max_length)]
    rows = [(s, e) for s, e in rows if loss_mask[s + 1 : e].any()] or rows
    ids = torch.cat([input_ids[s:e] for s, e in rows])
    return ids, torch.cat([loss_mask[s:e] for s, e in rows]), [e - s for s, e in rows]


# --------------------------------------------------------------------------------------------------
# The cache and the entry point


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [
        type(tokenizer).__name__,
        vocab,
        str(tokenizer.chat_template),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _save(path: Path, splits: dict[str, TokenizedDataset], label_names: list[str] | None) -> None:
    tensors, meta = {}, {"version": CACHE_VERSION, "label_names": label_names, "splits": {}}
    for name, split in splits.items():
        for field in ("input_ids", "loss_mask", "offsets", "class_labels"):
            if getattr(split, field) is not None:
                tensors[f"{name}.{field}"] = getattr(split, field).contiguous()
        meta["splits"][name] = {
            k: getattr(split, k) for k in ("num_examples", "num_truncated", "num_dropped")
        }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"peftcli": json.dumps(meta)}))


def _load(path: Path) -> tuple[dict[str, TokenizedDataset], list[str] | None] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["peftcli"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        splits = {
            name: TokenizedDataset(
                tensors[f"{name}.input_ids"],
                tensors[f"{name}.loss_mask"],
                tensors[f"{name}.offsets"],
                tensors.get(f"{name}.class_labels"),
                **stats,
            )
            for name, stats in meta["splits"].items()
        }
    except Exception:  # unreadable or from another layout: make it again
        return None
    return (splits, meta["label_names"]) if meta.get("version") == CACHE_VERSION else None


def prepare_data(
    data: DataSection, tokenizer, task: str, seed: int, cache_dir: str | Path | None = None
) -> PreparedData:
    """Load, split, render, tokenize, mask and maybe pack the recipe's data, or read it from the cache.

    task: "causal-lm" or "sequence-classification" (classification data). seed: train.seed, which
    picks the held-out validation rows. cache_dir: default `default_cache_dir()`. Raises UserError on
    any fault in the data, naming the source and the column, row or label.
    """
    classification = data.format == "classification"
    if classification != (task == "sequence-classification"):
        raise UserError(f"data.format: {data.format!r} data does not fit model.task {task!r}")
    if classification and data.packing:
        raise UserError("data.packing: packs causal-lm examples only, not classification data")
    if data.format == "chat" and not tokenizer.chat_template:
        raise UserError("data.format: chat needs a tokenizer with a chat template; this one has none")
    train_source = _Source(data.train, "data.train", (data.split,))
    held_out = isinstance(data.validation, float)
    val_source = (
        _Source(data.validation, "data.validation", VALIDATION_SPLITS)
        if isinstance(data.validation, str)
        else None
    )
    settings = {k: v for k, v in asdict(data).items() if k not in ("train", "validation")}
    key_parts = {
        "version": CACHE_VERSION,
        "task": task,
        "settings": settings,
        "train": train_source.fingerprint(),
        "validation": val_source.fingerprint() if val_source else data.validation,
        "seed": seed if held_out else None,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"{key}.safetensors"
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    cached = _load(path)
    if cached is not None:
        splits, label_names = cached
        return PreparedData(splits["train"], splits.get("validation"), label_names, pad_id, True, path)

    dataset = train_source.load()
    _check_columns(train_source, dataset.column_names, data)
    # With a held-out fraction the label set is the whole source's, so a rare class that lands only
    # in the held-out rows still gets an id.
    label_names = _label_names(dataset, data, train_source) if classification else None
    parts = [(dataset, list(range(1, len(dataset) + 1)), train_source)]
    if held_out:
        held = max(1, round(len(dataset) * data.validation))
        if held >= len(dataset):
            raise UserError(
                f"{train_source.where}: {len(dataset)} rows are too few to hold out "
                f"data.validation={data.validation}; add rows or set data.validation: null"
            )
        picked = set(random.Random(seed).sample(range(len(dataset)), held))
        train_rows = [i for i in range(len(dataset)) if i not in picked]
        parts = [
            (dataset.select(rows, keep_in_memory=True), [i + 1 for i in rows], train_source)
            for rows in (train_rows, sorted(picked))
        ]
    elif val_source is not None:
        validation = val_source.load()
        _check_columns(val_source, validation.column_names, data)
        parts.append((validation, list(range(1, len(validation) + 1)), val_source))
    built = [_build(ds, numbers, source, data, tokenizer, label_names) for ds, numbers, source in parts]
    splits = dict(zip(("train", "validation"), built, strict=False))
    _save(path, splits, label_names)
    return PreparedData(splits["train"], splits.get("validation"), label_names, pad_id, False, path)
