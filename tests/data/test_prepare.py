"""peftcli/data.py: every source and format, masking, truncation, packing, validation, cache, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from tiny import tiny_tokenizer
from tokenizers import processors

from peftcli.data.batches import IGNORE_INDEX, collate
from peftcli.data.cache import default_cache_dir
from peftcli.data.prepare import prepare_data, probe_example
from peftcli.data.render import probe_pair
from peftcli.data.rows import read_row, resolve_columns
from peftcli.data.sources import check_data_source
from peftcli.errors import UserError
from peftcli.recipe import DataSection

EOS = "</s>"
END = "<|im_end|>"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def write(path: Path, rows: list[dict]) -> str:
    """Write rows as the file type (or save_to_disk dir) the name says; returns the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    else:
        Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def prep(tmp_path: Path, tokenizer, task: str = "causal-lm", seed: int = 0, **fields):
    fields.setdefault("validation", None)
    return prepare_data(DataSection(**fields), tokenizer, task, seed, cache_dir=tmp_path / "cache")


def targets(tokenizer, example: dict) -> str:
    """The decoded tokens that carry a label."""
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def text_of(tokenizer, example: dict) -> str:
    return tokenizer.decode(example["input_ids"])


# --------------------------------------------------------------------------------------------------
# Sources and formats


@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.csv", "d.parquet", "saved"])
def test_text_format_from_every_local_source(tmp_path, tok, name):
    rows = [{"text": "hello world", "other": "x"}, {"text": "second one", "other": "y"}]
    prepared = prep(tmp_path, tok, train=write(tmp_path / name, rows), format="text")
    assert [text_of(tok, ex) for ex in prepared.train] == ["hello world" + EOS, "second one" + EOS]
    for example in prepared.train:  # loss on everything, the EOS included
        assert example["labels"] == example["input_ids"]
        assert example["attention_mask"] == [1] * len(example["input_ids"])
    assert prepared.num_examples == 2 and prepared.num_truncated == 0 and prepared.label_names is None


def test_dataset_dict_dir_uses_data_split(tmp_path, tok):
    path = tmp_path / "dict"
    DatasetDict(
        {
            "train": Dataset.from_list([{"text": "from train"}]),
            "extra": Dataset.from_list([{"text": "from extra"}]),
        }
    ).save_to_disk(str(path))
    assert text_of(tok, prep(tmp_path, tok, train=str(path)).train[0]) == "from train" + EOS
    assert text_of(tok, prep(tmp_path, tok, train=str(path), split="extra").train[0]) == "from extra" + EOS
    with pytest.raises(UserError, match=r"no split `trian`.*splits: train, extra.*did you mean `train`"):
        prep(tmp_path, tok, train=str(path), split="trian")


def test_text_keeps_the_tokenizers_bos_untrained(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    prepared = prep(tmp_path, tokenizer, train=write(tmp_path / "d.jsonl", [{"text": "abc"}]))
    example = prepared.train[0]
    assert example["input_ids"][0] == tokenizer.bos_token_id
    assert example["labels"][0] == IGNORE_INDEX
    assert targets(tokenizer, example) == "abc" + EOS


def test_instruction_with_chat_template_trains_on_the_answer_only(tmp_path, tok):
    rows = [
        {"instruction": "Name a color", "input": "", "output": "Blue"},
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
    ]
    prepared = prep(tmp_path, tok, train=write(tmp_path / "d.jsonl", rows), format="instruction")
    first, second = prepared.train[0], prepared.train[1]
    assert text_of(tok, first) == f"<|im_start|>user\nName a color{END}\n<|im_start|>assistant\nBlue{END}\n"
    assert targets(tok, first) == "Blue" + END
    assert "<|im_start|>user\nAdd\n\n2 and 3" + END in text_of(tok, second)
    assert targets(tok, second) == "5" + END
    # the targets are one contiguous run ending at the end token, not the newline after it
    labelled = [i for i, t in enumerate(second["labels"]) if t != IGNORE_INDEX]
    assert (
        labelled == list(range(labelled[0], labelled[-1] + 1)) and labelled[-1] == len(second["labels"]) - 2
    )


@pytest.mark.parametrize("with_input_column", [True, False])
def test_instruction_without_chat_template_uses_the_plain_layout(tmp_path, plain_tok, with_input_column):
    rows = [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a color", "input": None, "output": "Blue"},
    ]
    if not with_input_column:
        rows = [{k: v for k, v in row.items() if k != "input"} for row in rows]
    prepared = prep(tmp_path, plain_tok, train=write(tmp_path / "d.jsonl", rows), format="instruction")
    if with_input_column:
        expected = "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n5" + EOS
        assert text_of(plain_tok, prepared.train[0]) == expected
    assert (
        text_of(plain_tok, prepared.train[1]) == "### Instruction:\nName a color\n\n### Response:\nBlue" + EOS
    )
    assert targets(plain_tok, prepared.train[0]) == "5" + EOS
    assert targets(plain_tok, prepared.train[1]) == "Blue" + EOS


def test_chat_trains_on_every_assistant_turn_only(tmp_path, tok):
    prepared = prep(tmp_path, tok, train=write(tmp_path / "d.jsonl", [{"messages": CHAT}]), format="chat")
    example = prepared.train[0]
    assert text_of(tok, example) == tok.apply_chat_template(CHAT, tokenize=False)
    assert targets(tok, example) == f"Hello!{END}Paris.{END}"
    runs, previous = [], None  # contiguous labelled runs, decoded one by one
    for i, label in enumerate(example["labels"]):
        if label != IGNORE_INDEX:
            if previous != i - 1:
                runs.append([])
            runs[-1].append(label)
            previous = i
    assert [tok.decode(run) for run in runs] == ["Hello!" + END, "Paris." + END]


def test_chat_template_with_a_default_system_prompt_keeps_it_untrained(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault prompt<|im_end|>\n"
        "{% endif %}" + tokenizer.chat_template
    )
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    example = prep(
        tmp_path, tokenizer, train=write(tmp_path / "d.jsonl", [{"messages": messages}]), format="chat"
    ).train[0]
    assert text_of(tokenizer, example).startswith("<|im_start|>system\nDefault prompt")
    assert targets(tokenizer, example) == "4" + END


def test_chat_template_that_rewrites_earlier_turns_falls_back_to_finding_the_answers(tmp_path):
    """Like templates that drop earlier answers' reasoning: a rendered prefix is not a prefix of the whole."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [
        {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "<think>x</think>A."},
        {"role": "user", "content": "b?"},
        {"role": "assistant", "content": "B."},
    ]
    example = prep(
        tmp_path, tokenizer, train=write(tmp_path / "d.jsonl", [{"messages": messages}]), format="chat"
    ).train[0]
    assert "<think>" not in text_of(tokenizer, example)
    assert targets(tokenizer, example) == f"A.{END}B.{END}"


def test_train_on_inputs_trains_on_everything(tmp_path, tok):
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5"}]
    for fmt, written in (("instruction", rows), ("chat", [{"messages": CHAT}])):
        prepared = prep(
            tmp_path, tok, train=write(tmp_path / f"{fmt}.jsonl", written), format=fmt, train_on_inputs=True
        )
        example = prepared.train[0]
        assert example["labels"] == example["input_ids"]


def test_classification_maps_string_labels_in_sorted_order(tmp_path, tok):
    rows = [
        {"text": "good", "label": "pos"},
        {"text": "bad", "label": "neg"},
        {"text": "meh", "label": "mid"},
    ]
    prepared = prep(
        tmp_path,
        tok,
        "sequence-classification",
        train=write(tmp_path / "d.csv", rows),
        format="classification",
    )
    assert prepared.label_names == ["mid", "neg", "pos"]
    assert [(text_of(tok, ex), ex["labels"]) for ex in prepared.train] == [
        ("good", 2),
        ("bad", 1),
        ("meh", 0),
    ]
    batch = collate([prepared.train[0], prepared.train[1]], prepared.pad_id)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [2, 1]
    assert batch["input_ids"].shape == (2, 4)


def test_classification_int_labels_and_class_label_feature(tmp_path, tok):
    rows = [{"text": "one", "label": 3}, {"text": "two", "label": 1}]
    prepared = prep(
        tmp_path,
        tok,
        "sequence-classification",
        train=write(tmp_path / "d.jsonl", rows),
        format="classification",
    )
    assert prepared.label_names == ["1", "3"] and [ex["labels"] for ex in prepared.train] == [1, 0]
    features = Features({"text": Value("string"), "label": ClassLabel(names=["zebra", "apple"])})
    saved = tmp_path / "saved"
    Dataset.from_dict({"text": ["z", "a"], "label": [0, 1]}, features=features).save_to_disk(str(saved))
    prepared = prep(tmp_path, tok, "sequence-classification", train=str(saved), format="classification")
    assert prepared.label_names == ["zebra", "apple"]  # the dataset's own order
    assert [ex["labels"] for ex in prepared.train] == [0, 1]


def test_classification_truncation_and_unseen_validation_label(tmp_path, tok):
    rows = [{"text": "x" * 20, "label": "a"}, {"text": "short", "label": "b"}]
    train = write(tmp_path / "d.jsonl", rows)
    prepared = prep(
        tmp_path, tok, "sequence-classification", train=train, format="classification", max_length=8
    )
    assert prepared.num_truncated == 1 and prepared.train.lengths == [8, 5]
    validation = write(tmp_path / "v.jsonl", [{"text": "t", "label": "a"}, {"text": "u", "label": "zzz"}])
    with pytest.raises(
        UserError, match=r"v\.jsonl: line 2: column `label`: label `zzz` never appears in the training data"
    ):
        prep(
            tmp_path,
            tok,
            "sequence-classification",
            train=train,
            format="classification",
            validation=validation,
        )


# --------------------------------------------------------------------------------------------------
# Truncation, packing, validation


def test_truncation_is_counted_and_rows_without_targets_are_dropped(tmp_path, tok, plain_tok):
    rows = [{"text": "a" * 30}, {"text": "short"}, {"text": "b" * 12}, {"text": "   "}]
    prepared = prep(tmp_path, tok, train=write(tmp_path / "t.jsonl", rows), max_length=10)
    assert prepared.num_truncated == 2 and prepared.train.num_dropped == 1
    assert prepared.train.lengths == [10, 6, 10]
    # an instruction whose prompt fills max_length has no answer left to learn
    rows = [{"instruction": "i" * 60, "output": "long prompt"}, {"instruction": "q", "output": "ok"}]
    prepared = prep(
        tmp_path, plain_tok, train=write(tmp_path / "i.jsonl", rows), format="instruction", max_length=48
    )
    assert (prepared.num_truncated, prepared.train.num_dropped, len(prepared.train)) == (1, 1, 1)
    assert "2 examples" not in prepared.describe() and "1 cut to max_length" in prepared.describe()


@pytest.mark.parametrize("fmt", ["text", "chat"])
def test_packing_fills_rows_and_keeps_label_masks(tmp_path, tok, fmt):
    if fmt == "text":
        rows = [{"text": "w" * n} for n in (3, 9, 4, 15, 2, 7)]
    else:
        rows = [
            {"messages": [{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "a" * n}]}
            for n in (1, 5, 3, 2)
        ]
    train, length = write(tmp_path / "d.jsonl", rows), 16 if fmt == "text" else 48
    plain = prep(tmp_path, tok, train=train, format=fmt, max_length=length)
    packed = prep(tmp_path, tok, train=train, format=fmt, max_length=length, packing=True)
    assert plain.num_truncated == 0 and packed.num_examples == len(rows)
    assert len(packed.train) < len(rows)
    assert all(n == length for n in packed.train.lengths[:-1]) and 0 < packed.train.lengths[-1] <= length
    stream_ids = [t for ex in packed.train for t in ex["input_ids"]]
    stream_labels = [t for ex in packed.train for t in ex["labels"]]
    expected_ids, expected_labels = [], []
    for ex in plain.train:  # chat examples get an untrained EOS separator
        expected_ids += ex["input_ids"]
        expected_labels += ex["labels"]
        if ex["input_ids"][-1] != tok.eos_token_id:
            expected_ids.append(tok.eos_token_id)
            expected_labels.append(IGNORE_INDEX)
    assert stream_ids == expected_ids and stream_labels == expected_labels


def test_validation_fraction_is_deterministic_and_disjoint(tmp_path, tok):
    train = write(tmp_path / "d.jsonl", [{"text": f"row {i:02d}"} for i in range(20)])

    def split(seed):
        prepared = prep(tmp_path, tok, seed=seed, train=train, validation=0.25)
        return ({text_of(tok, ex) for ex in prepared.train}, [text_of(tok, ex) for ex in prepared.validation])

    train_texts, val_texts = split(0)
    assert len(train_texts) == 15 and len(val_texts) == 5 and not train_texts & set(val_texts)
    assert train_texts | set(val_texts) == {f"row {i:02d}{EOS}" for i in range(20)}
    assert split(0) == (train_texts, val_texts)  # from the cache: must match the fresh split
    fresh_cache = tmp_path / "cache2"
    again = prepare_data(
        DataSection(train=train, validation=0.25), tok, "causal-lm", 0, cache_dir=fresh_cache
    )
    assert [text_of(tok, ex) for ex in again.validation] == val_texts and not again.cache_hit
    assert split(1)[1] != val_texts
    with pytest.raises(UserError, match=r"one\.jsonl: 1 rows are too few to hold out"):
        prep(tmp_path, tok, train=write(tmp_path / "one.jsonl", [{"text": "x"}]), validation=0.5)


def test_validation_file_and_none(tmp_path, tok):
    train = write(tmp_path / "d.jsonl", [{"text": "train row"}])
    validation = write(tmp_path / "v.parquet", [{"text": "val row"}, {"text": "val two"}])
    prepared = prep(tmp_path, tok, train=train, validation=validation)
    assert [text_of(tok, ex) for ex in prepared.validation] == ["val row" + EOS, "val two" + EOS]
    assert prep(tmp_path, tok, train=train, validation=None).validation is None


def test_probe_is_the_first_validation_row_the_run_evaluates_on(tmp_path, tok):
    rows = [{"text": f"row {i:02d} is one of twenty rows"} for i in range(20)]
    train = write(tmp_path / "d.jsonl", rows)
    prepared = prep(tmp_path, tok, seed=3, train=train, validation=0.25)
    first = text_of(tok, prepared.validation[0]).removesuffix(EOS)
    prompt, reference = probe_example(DataSection(train=train, validation=0.25), seed=3)
    assert f"{prompt} {reference}" == first and prompt == " ".join(first.split()[:3])  # half of 7 words
    validation = write(
        tmp_path / "v.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}, {"messages": CHAT}]
    )
    chat = DataSection(train=train, validation=validation, format="chat")
    assert probe_example(chat, seed=0) == ("Hi", "Hello!")  # the first row has no answer to show
    assert probe_example(DataSection(train=train, validation=None), seed=0) is None
    classes = DataSection(train=train, validation=validation, format="classification")
    assert probe_example(classes, seed=0) is None


@pytest.mark.parametrize(
    ("fmt", "row", "expected"),
    [
        (
            "instruction",
            {"instruction": "Double it.", "input": "4", "output": " 8 "},
            ("Double it.\n\n4", "8"),
        ),
        ("instruction", {"instruction": "Say hi.", "output": "hi"}, ("Say hi.", "hi")),
        ("instruction", {"instruction": "Say hi.", "output": ""}, None),
        ("text", {"text": "one"}, None),
        ("text", {"text": "a b c d"}, ("a b", "c d")),
        ("chat", {"messages": [{"role": "assistant", "content": "x"}]}, None),
    ],
)
def test_probe_pair_by_format(fmt, row, expected):
    data = DataSection(format=fmt)
    row = read_row(row, resolve_columns(data, list(row), "row 1"), data, "row 1")
    assert probe_pair(row, fmt) == expected


# --------------------------------------------------------------------------------------------------
# Cache


def test_cache_hit_and_misses(tmp_path, tok):
    train = tmp_path / "d.jsonl"
    write(train, [{"text": "hello"}, {"text": "there"}])
    first = prep(tmp_path, tok, train=str(train))
    second = prep(tmp_path, tok, train=str(train))
    assert not first.cache_hit and second.cache_hit and first.cache_path == second.cache_path
    assert first.cache_path.is_file() and [ex for ex in first.train] == [ex for ex in second.train]
    assert "from cache" in second.describe()
    assert not prep(tmp_path, tok, train=str(train), max_length=9).cache_hit  # settings changed
    other = tiny_tokenizer()
    other.chat_template = "{{ messages }}"
    assert not prep(tmp_path, other, train=str(train)).cache_hit  # tokenizer changed
    write(train, [{"text": "hello"}, {"text": "changed"}])
    changed = prep(tmp_path, tok, train=str(train))
    assert not changed.cache_hit and text_of(tok, changed.train[1]) == "changed" + EOS
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # atomic writes leave no temp files


def test_broken_cache_file_is_rebuilt(tmp_path, tok):
    train = write(tmp_path / "d.jsonl", [{"text": "hello"}])
    first = prep(tmp_path, tok, train=train)
    first.cache_path.write_bytes(b"garbage")
    again = prep(tmp_path, tok, train=train)
    assert not again.cache_hit and text_of(tok, again.train[0]) == "hello" + EOS
    assert prep(tmp_path, tok, train=train).cache_hit


def test_default_cache_dir_follows_peftcli_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTCLI_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "data"
    monkeypatch.delenv("PEFTCLI_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "peftcli" / "data"


# --------------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path, tok):
    missing = str(tmp_path / "nope.jsonl")
    for call in (
        lambda: check_data_source(DataSection(train=missing)),
        lambda: prep(tmp_path, tok, train=missing),
    ):
        with pytest.raises(UserError, match=r"data\.train: not found: .*nope\.jsonl"):
            call()
    good = write(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match=r"data\.validation: not found: .*v\.csv"):
        check_data_source(DataSection(train=good, validation=str(tmp_path / "v.csv")))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match=r"data\.train: unsupported file type \.txt: .*d\.txt"):
        check_data_source(DataSection(train=str(tmp_path / "d.txt")))
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match=r"folder: a directory, but not one written by Dataset.save_to_disk"):
        check_data_source(DataSection(train=str(tmp_path / "folder")))


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.parquet", "saved"])
def test_missing_column_names_the_columns_that_exist(tmp_path, tok, name):
    train = write(tmp_path / name, [{"txt": "a", "label": "x"}])
    pattern = (
        r"no column `text` \(the text format's `text`; name yours with data.columns: \{text: \.\.\.\}\); "
        r"its columns: txt, label \(did you mean `txt`\?\)"
    )
    with pytest.raises(UserError, match=pattern):
        check_data_source(DataSection(train=train))
    with pytest.raises(UserError, match=pattern):
        prep(tmp_path, tok, train=train)
    with pytest.raises(UserError, match=r"no column `output` \(the instruction format's `output`"):
        check_data_source(
            DataSection(
                train=write(tmp_path / "i.jsonl", [{"instruction": "a", "out": "b"}]), format="instruction"
            )
        )


@pytest.mark.parametrize("content", ["", "\n", "[]", "text,label\n"])
def test_empty_dataset(tmp_path, tok, content):
    path = tmp_path / ("d.csv" if "," in content else "d.jsonl" if content != "[]" else "d.json")
    path.write_text(content)
    for call in (
        lambda: check_data_source(DataSection(train=str(path))),
        lambda: prep(tmp_path, tok, train=str(path)),
    ):
        with pytest.raises(UserError, match=rf"{path.name}: the dataset is empty"):
            call()


def test_all_examples_empty_after_tokenization(tmp_path, tok, plain_tok):
    with pytest.raises(UserError, match=r"d\.jsonl: all 2 rows are empty after tokenization"):
        prep(tmp_path, tok, train=write(tmp_path / "d.jsonl", [{"text": ""}, {"text": None}]))
    rows = [
        {"text": " ", "label": "a"},
        {"text": "", "label": "b"},
    ]  # two classes: one would be refused first
    with pytest.raises(UserError, match=r"c\.jsonl: all 2 rows are empty after tokenization"):
        prep(
            tmp_path,
            tok,
            "sequence-classification",
            train=write(tmp_path / "c.jsonl", rows),
            format="classification",
        )
    rows = [{"instruction": "i" * 40, "output": "o"}]
    with pytest.raises(UserError, match=r"all 1 rows are empty.*1 were cut at max_length=16"):
        prep(
            tmp_path, plain_tok, train=write(tmp_path / "i.jsonl", rows), format="instruction", max_length=16
        )


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("just text", r": expected a list of \{role, content\} messages"),
        ([], r": expected a list of \{role, content\} messages"),
        ([{"role": "user"}], r", message 1: `content`: expected text"),
        ([{"role": "user", "content": "hi"}, "hello"], r", message 2: expected a \{role, content\} message"),
        ([{"content": "hi"}], r", message 1: expected a \{role, content\} message"),
    ],
)
def test_malformed_chat_rows(tmp_path, tok, bad, says):
    rows = [{"messages": CHAT}, {"messages": bad}]
    train = tmp_path / "d.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pattern = r"d\.jsonl: line 2: column `messages`" + says
    with pytest.raises(UserError, match=pattern):
        check_data_source(DataSection(train=str(train), format="chat"))
    with pytest.raises(UserError, match=pattern):
        prep(tmp_path, tok, train=str(train), format="chat")


def test_format_and_tokenizer_mismatches(tmp_path, tok, plain_tok):
    train = write(tmp_path / "d.jsonl", [{"messages": CHAT, "text": "x", "label": "a"}])
    with pytest.raises(UserError, match="chat needs a tokenizer with a chat template"):
        prep(tmp_path, plain_tok, train=train, format="chat")
    with pytest.raises(UserError, match="does not fit model.task"):
        prep(tmp_path, tok, train=train, format="classification")
    with pytest.raises(UserError, match="data.packing"):
        prep(tmp_path, tok, "sequence-classification", train=train, format="classification", packing=True)


def test_check_data_source_accepts_good_sources(tmp_path):
    check_data_source(
        DataSection(
            train=write(tmp_path / "d.json", [{"messages": CHAT}]),
            format="chat",
            validation=write(tmp_path / "v.parquet", [{"messages": CHAT}]),
        )
    )
    check_data_source(DataSection(train="some-org/some-dataset"))  # a hub name: not downloaded here


# --------------------------------------------------------------------------------------------------
# Batching


def test_collate_right_pads(tok):
    batch = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())
