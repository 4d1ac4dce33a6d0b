"""peftcli/data/sources.py: JSON and JSON Lines read line by line, every fault named with its file, its row
(its line, in JSON Lines) and its column, wherever in the file it is; first rows checked before a model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftcli.data.prepare import prepare_data
from peftcli.data.sources import DataSource, check_data_source
from peftcli.errors import UserError
from peftcli.recipe import DataSection


def lines(path: Path, rows: list) -> str:
    """One JSON value per line; a str item is written as it is (a broken line)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def both(tmp_path, tok, data: DataSection, pattern: str, early: bool = True) -> None:
    """The fault is refused by the full read (prepare_data), and by the first-rows check when it is early."""
    if early:
        with pytest.raises(UserError, match=pattern):
            check_data_source(data)
    else:
        check_data_source(data)  # past the first rows: not read before the model loads
    with pytest.raises(UserError, match=pattern):
        prepare_data(data, tok, "causal-lm", 0, cache_dir=tmp_path / "cache")


GOOD = {"text": "fine"}


@pytest.mark.parametrize("line", [8, 40])
def test_an_invalid_json_line_anywhere_is_named_by_its_line(tmp_path, tok, line):
    rows = [GOOD] * 60
    rows[line - 1] = '{"text": "broken" "x": 1}'
    data = DataSection(train=lines(tmp_path / "d.jsonl", rows), validation=None)
    pattern = rf"data\.train: .*d\.jsonl: line {line}: not valid JSON: Expecting ',' delimiter \(column 19\)"
    both(tmp_path, tok, data, pattern, early=line <= 20)


def test_blank_lines_count_as_an_editor_counts_them(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n   \n" + json.dumps(GOOD) + "\n" + '{"text": [1]}\n')
    data = DataSection(train=str(path), validation=None)
    both(tmp_path, tok, data, r"d\.jsonl: line 5: column `text`: expected text, got \[1\]")


def test_a_line_that_is_not_an_object(tmp_path, tok):
    data = DataSection(train=lines(tmp_path / "d.jsonl", [GOOD, GOOD, [1, 2]]), validation=None)
    both(tmp_path, tok, data, r"d\.jsonl: line 3: each row must be a JSON object, got \[1, 2\]")


def test_a_json_array_names_the_line_of_a_syntax_error_and_the_row_of_a_bad_value(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    both(tmp_path, tok, DataSection(train=str(path), validation=None), r"d\.json: line 3: not valid JSON")
    path.write_text(json.dumps([GOOD, GOOD, {"text": {"nested": 1}}], indent=1))
    both(tmp_path, tok, DataSection(train=str(path), validation=None), r"d\.json: row 3: column `text`")
    path.write_text(json.dumps({"rows": [GOOD]}, indent=2))  # one object over several lines: no JSON Lines
    both(tmp_path, tok, DataSection(train=str(path), validation=None), r"d\.json: line 1: not valid JSON")


def test_rows_past_the_first_twenty_that_datasets_could_not_type(tmp_path, tok):
    """datasets' JSON loader used to fail on row ~30 with "An error occurred while generating the dataset";
    an unused column of mixed types is now no fault at all, a used one is named with its line."""
    rows = [{"text": f"row {i}", "id": i if i < 30 else f"id-{i}"} for i in range(40)]
    train = lines(tmp_path / "d.jsonl", rows)
    prepared = prepare_data(DataSection(train=train, validation=None), tok, "causal-lm", 0, tmp_path / "c")
    assert prepared.num_examples == 40
    rows[34] = {"text": {"oops": 1}}
    data = DataSection(train=lines(tmp_path / "e.jsonl", rows), validation=None)
    both(
        tmp_path,
        tok,
        data,
        r"e\.jsonl: line 35: column `text`: expected text, got \{'oops': 1\}",
        early=False,
    )


def test_a_bad_chat_row_past_the_first_twenty(tmp_path, tok):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [chat] * 30
    rows[24] = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    data = DataSection(train=lines(tmp_path / "d.jsonl", rows), format="chat", validation=None)
    pattern = (
        r"d\.jsonl: line 25: column `messages`, message 2: unknown role `bot`; known roles: system, user"
    )
    both(tmp_path, tok, data, pattern, early=False)


def test_not_utf8(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    both(
        tmp_path,
        tok,
        DataSection(train=str(path), validation=None),
        r"d\.jsonl: not UTF-8 text \(byte 0xe9\)",
    )


def test_csv_rows_are_counted_from_the_first_data_row(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfine,a\nfine,b\n")
    data = DataSection(
        train=str(path), format="kto", validation=None, columns={"prompt": "text", "completion": "text"}
    )
    both(tmp_path, tok, data, r"d\.csv: row 1: column `label`: expected true \(a desirable answer\) or false")


def test_row_numbers_and_columns_of_each_kind(tmp_path):
    source = DataSource(
        lines(tmp_path / "d.jsonl", [GOOD, {"text": "b", "extra": 1}]), "data.train", ("train",)
    )
    assert source.unit == "line" and source.columns() == ["text", "extra"]
    table = source.read(["extra"])
    assert table.rows == [{"extra": None}, {"extra": 1}] and table.numbers == [1, 2]
    array = tmp_path / "a.json"
    array.write_text(json.dumps([GOOD]))
    assert DataSource(str(array), "data.train", ("train",)).unit == "row"
