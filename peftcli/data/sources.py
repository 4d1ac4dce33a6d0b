"""Data sources as a recipe names them: a .json/.jsonl/.csv/.parquet file, a `save_to_disk` dir, or a
hub dataset name.

`DataSource` is the one place a data name is classified (the recipe reader builds one per source, once, and
names the file and line of a fault); it loads the data lazily and reads a file's first rows cheaply.
`check_data_source` refuses a bad source before any model is loaded. The `datasets` library is imported
only when data is loaded.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from peftcli.data.render import FORMAT_COLUMNS, chat_messages, short
from peftcli.errors import FieldError, UserError, did_you_mean, not_found

if TYPE_CHECKING:
    import datasets

    from peftcli.recipe import DataSection

FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
VALIDATION_SPLITS = ("validation", "valid", "dev", "test")  # tried in order in a DatasetDict
_FRACTION = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class DataSource:
    """A data source as the recipe names it, loaded lazily; `where` prefixes every message about it.

    `key` is the recipe key that names it (data.train, data.validation); `splits` the splits to try in a
    DatasetDict or on the hub, in order. `local_only`: a name that is no local file or dir is an error,
    not a hub dataset. Raises FieldError (under `key`) for a name that cannot be a source.
    """

    def __init__(self, name: str, key: str, splits: tuple[str, ...], local_only: bool = False):
        self.name, self.splits, self.where = name, splits, f"{key}: {name}"
        self.path = Path(name).expanduser()
        self.suffix = self.path.suffix.lower()
        self._dataset: datasets.Dataset | None = None
        if not name:
            raise FieldError(key, "required: a data file, a saved dataset dir or a hub dataset name")
        if self.path.is_file():
            if self.suffix not in FILE_LOADERS:
                kinds = ", ".join(FILE_LOADERS)
                suffix = self.path.suffix or "(none)"
                raise FieldError(
                    key, f"unsupported file type {suffix}: {name}; use {kinds} or a `save_to_disk` dir"
                )
            self.kind = "file"
        elif self.path.is_dir():
            if not any((self.path / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
                raise FieldError(key, f"{name}: a directory, but not one written by Dataset.save_to_disk")
            self.kind = "disk"
        elif local_only or name.startswith((".", "/", "~")) or self.suffix in FILE_LOADERS:
            hint = ""
            if _FRACTION.fullmatch(name.strip()):
                hint = f"; for a fraction write a number without quotes: {name.strip()}"
            raise FieldError(key, not_found(name) + hint)
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
        import datasets

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
        try:
            return self._peek(rows)
        except UserError:
            raise
        except Exception as e:  # pyarrow, csv, codecs: a file that is not what its name says
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{self.where}: could not read it as {self.suffix[1:]}: {first}") from e

    def _peek(self, rows: int) -> tuple[list[str], list[dict]]:
        if self.kind != "file":
            dataset = self.load()
            return dataset.column_names, dataset.select(range(min(rows, len(dataset)))).to_list()
        if self.suffix == ".parquet":
            import pyarrow.parquet as pq

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
                raise UserError(f"{self.where}: each row must be a JSON object, got {short(row)}")
        return found


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars while a local file is converted: it takes a moment and the CLI logs its own lines."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def check_columns(source: DataSource, columns: list[str], data: DataSection) -> None:
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
    for source in filter(None, (data.train_source, data.validation_source)):
        if source.kind == "hub":
            continue
        columns, rows = source.peek()
        if not rows:
            raise UserError(f"{source.where}: the dataset is empty")
        check_columns(source, columns, data)
        if data.format == "chat":
            for number, row in enumerate(rows, 1):
                chat_messages(
                    row[data.messages_column],
                    f"{source.where}: row {number}: column `{data.messages_column}`",
                )
