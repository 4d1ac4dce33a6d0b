"""Data sources as a recipe names them: a .json/.jsonl/.csv/.parquet file, a `save_to_disk` dir, or a
hub dataset name.

`DataSource` is the one place a data name is classified (the recipe reader builds one per source, once, and
names the file and line of a fault); it reads the data lazily and a file's first rows cheaply. JSON and JSON
Lines are read here, line by line, so a malformed line anywhere is reported with its number (JSON Lines
rows are numbered by their line, as an editor shows them; other sources' rows from 1). The other kinds go
through the `datasets` library, imported only when they are read. `check_data_source` refuses a bad source
before any model is loaded.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from peftcli.data.rows import read_row, resolve_columns, short
from peftcli.errors import FieldError, UserError, did_you_mean, not_found

if TYPE_CHECKING:
    import datasets

    from peftcli.recipe import DataSection

FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
VALIDATION_SPLITS = ("validation", "valid", "dev", "test")  # tried in order in a DatasetDict
_FRACTION = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass
class Table:
    """Rows of a source, with only the columns asked for. numbers[i] is row i's number as the source
    counts it (JSON Lines: its line); class_names: a `datasets.ClassLabel` column's names, in id order."""

    rows: list[dict]
    numbers: list[int]
    unit: str = "row"  # what a number counts: "line" or "row"
    class_names: dict[str, list[str]] = field(default_factory=dict)

    def select(self, indices: list[int]) -> Table:
        return Table(
            [self.rows[i] for i in indices], [self.numbers[i] for i in indices], self.unit, self.class_names
        )

    def __len__(self) -> int:
        return len(self.rows)


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
        self._json: list[tuple[int, dict]] | None = None  # (number, row) of a JSON file, once read
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
        return f"{self.kind}:{self._load()._fingerprint}"

    @property
    def is_json(self) -> bool:
        return self.kind == "file" and FILE_LOADERS[self.suffix] == "json"

    @property
    def unit(self) -> str:
        """What a row's number counts: lines in JSON Lines, rows elsewhere."""
        return "line" if self.is_json and self._json_lines() else "row"

    def columns(self) -> list[str]:
        """Every column name, in order of first appearance (JSON rows may each have their own keys)."""
        if self.is_json:
            return list(dict.fromkeys(key for _, row in self._json_rows() for key in row))
        return self._load().column_names

    def read(self, columns: list[str]) -> Table:
        """The rows, with just `columns` (JSON rows lacking one get None)."""
        if self.is_json:
            numbered = self._json_rows()
            rows = [{c: row.get(c) for c in columns} for _, row in numbered]
            return Table(rows, [n for n, _ in numbered], self.unit)
        import datasets

        dataset = self._load().select_columns(columns)
        names = {c: list(f.names) for c, f in dataset.features.items() if isinstance(f, datasets.ClassLabel)}
        return Table(dataset.to_list(), list(range(1, len(dataset) + 1)), "row", names)

    def _load(self) -> datasets.Dataset:
        if self._dataset is None:
            if self.kind == "file" and not self.peek()[1]:
                raise UserError(f"{self.where}: the dataset is empty")
            self._dataset = self._load_dataset()
            if len(self._dataset) == 0:
                raise UserError(f"{self.where}: the dataset is empty")
        return self._dataset

    def _load_dataset(self) -> datasets.Dataset:
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

    def peek(self, rows: int = 20) -> tuple[list[str], list[tuple[int, dict]]]:
        """The column names and the first rows with their numbers, read cheaply: no file is loaded whole."""
        try:
            return self._peek(rows)
        except UserError:
            raise
        except Exception as e:  # pyarrow, csv, codecs: a file that is not what its name says
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{self.where}: could not read it as {self.suffix[1:]}: {first}") from e

    def _peek(self, rows: int) -> tuple[list[str], list[tuple[int, dict]]]:
        if self.is_json:
            found = self._json_rows(limit=rows) if self._json is None else self._json[:rows]
            return list(dict.fromkeys(key for _, row in found for key in row)), found
        if self.kind != "file":
            dataset = self._load()
            head = dataset.select(range(min(rows, len(dataset)))).to_list()
            return dataset.column_names, list(enumerate(head, 1))
        if self.suffix == ".parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(self.path)
            first = next(parquet.iter_batches(batch_size=rows), None)
            return parquet.schema_arrow.names, list(
                enumerate(first.to_pylist() if first is not None else [], 1)
            )
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(enumerate(itertools.islice(reader, rows), 1))

    def _json_lines(self) -> bool:
        """JSON Lines (an object per line) rather than a JSON array: the two layouts a .json file may hold."""
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return not f.read(4096).lstrip().startswith("[")

    def _json_rows(self, limit: int | None = None) -> list[tuple[int, dict]]:
        """(number, row) of every row of a JSON file, or of the first `limit`; a UserError naming the line of
        the first line that is no JSON object."""
        if self._json is not None:
            return self._json
        try:
            found = self._read_json_lines(limit) if self._json_lines() else self._read_json_array(limit)
        except UnicodeDecodeError as e:
            raise UserError(f"{self.where}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from e
        if limit is None:
            if not found:
                raise UserError(f"{self.where}: the dataset is empty")
            self._json = found
        return found

    def _read_json_lines(self, limit: int | None) -> list[tuple[int, dict]]:
        found = []
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if limit is not None and len(found) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{self.where}: line {number}: not valid JSON: {e.msg} (column {e.colno})"
                    ) from e
                found.append((number, self._object(row, f"line {number}")))
        return found

    def _read_json_array(self, limit: int | None) -> list[tuple[int, dict]]:
        try:
            value = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(
                f"{self.where}: line {e.lineno}: not valid JSON: {e.msg} (column {e.colno})"
            ) from e
        if not isinstance(value, list):
            raise UserError(
                f"{self.where}: expected a JSON array of objects or JSON Lines, got {short(value)}"
            )
        return [(n, self._object(row, f"row {n}")) for n, row in enumerate(value[:limit], 1)]

    def _object(self, row, at: str) -> dict:
        if not isinstance(row, dict):
            raise UserError(f"{self.where}: {at}: each row must be a JSON object, got {short(row)}")
        return row


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


def check_data_source(data: DataSection) -> None:
    """Refuse missing files, missing columns and malformed first rows before any model is loaded.

    Needs no tokenizer and reads only the first rows of a file. A hub dataset is not checked here:
    that would download it.
    """
    for source in filter(None, (data.train_source, data.validation_source)):
        if source.kind == "hub":
            continue
        present, rows = source.peek()
        if not rows:
            raise UserError(f"{source.where}: the dataset is empty")
        columns = resolve_columns(data, present, source.where)
        for number, row in rows:
            read_row(row, columns, data, f"{source.where}: {source.unit} {number}")
