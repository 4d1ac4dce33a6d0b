"""The data formats beyond plain SFT (peftcli/data/rows.py, render.py, examples.py through prepare_data):
preference pairs and KTO rows, sharegpt and OpenAI chat shapes, data.columns renames for every format,
data.roles, pre-tokenized rows and template-free segments, and their errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftcli.data.batches import IGNORE_INDEX, collate
from peftcli.data.prepare import prepare_data
from peftcli.data.sources import check_data_source
from peftcli.errors import UserError
from peftcli.recipe import DataSection

EOS, END = "</s>", "<|im_end|>"


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def prep(tmp_path, tokenizer, rows, fmt, name="d.jsonl", **fields):
    data = DataSection(train=write(tmp_path / name, rows), format=fmt, validation=None, **fields)
    check_data_source(data)
    return prepare_data(data, tokenizer, "causal-lm", 0, cache_dir=tmp_path / "cache")


def refused(tmp_path, tokenizer, rows, fmt, pattern, **fields):
    data = DataSection(train=write(tmp_path / "bad.jsonl", rows), format=fmt, validation=None, **fields)
    with pytest.raises(UserError, match=pattern):
        check_data_source(data)
    with pytest.raises(UserError, match=pattern):
        prepare_data(data, tokenizer, "causal-lm", 0, cache_dir=tmp_path / "cache")


def decoded(tokenizer, row: dict) -> tuple[str, str]:
    """(the row's text, its target tokens' text)."""
    targets = [t for t in row["labels"] if t != IGNORE_INDEX]
    return tokenizer.decode(row["input_ids"]), tokenizer.decode(targets)


def rows_of(split) -> list[list[dict]]:
    return [split[i]["rows"] for i in range(len(split))]


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


# --------------------------------------------------------------------------------------------------
# preference and kto


def test_preference_strings_through_the_chat_template_train_on_the_answer_only(tmp_path, tok):
    rows = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."}]
    split = prep(tmp_path, tok, rows, "preference").train
    assert split.rows_per_example == 2 and len(split) == 1 and split.num_examples == 1
    (chosen, chosen_targets), (rejected, rejected_targets) = (decoded(tok, r) for r in rows_of(split)[0])
    prompt = "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert chosen == prompt + "Paris.<|im_end|>\n" and chosen_targets == "Paris." + END
    assert rejected == prompt + "Lyon, I think.<|im_end|>\n" and rejected_targets == "Lyon, I think." + END


def test_preference_messages_keep_the_history_untrained(tmp_path, tok):
    history = chat(("user", "Hi"), ("assistant", "Hello!"), ("user", "Capital of France?"))
    rows = [{"prompt": history, "chosen": chat(("assistant", "Paris.")), "rejected": "Rome."}]
    (chosen, rejected) = rows_of(prep(tmp_path, tok, rows, "preference").train)[0]
    assert decoded(tok, chosen)[1] == "Paris." + END and decoded(tok, rejected)[1] == "Rome." + END
    assert "Hello!" in decoded(tok, chosen)[0]  # in the prompt, not a target


def test_preference_without_a_prompt_column_takes_the_shared_messages(tmp_path, tok):
    """Anthropic-HH-style rows: chosen and rejected are whole conversations."""
    shared = chat(("user", "Capital of France?"))
    rows = [
        {"chosen": shared + chat(("assistant", "Paris.")), "rejected": shared + chat(("assistant", "Rome."))}
    ]
    implicit = rows_of(prep(tmp_path, tok, rows, "preference", name="a.jsonl").train)[0]
    explicit = [{"prompt": shared, "chosen": "Paris.", "rejected": "Rome."}]
    assert implicit == rows_of(prep(tmp_path, tok, explicit, "preference", name="b.jsonl").train)[0]
    refused(
        tmp_path, tok, [{"chosen": "Paris.", "rejected": "Rome."}], "preference", r"without a prompt column"
    )


def test_preference_without_a_template_joins_the_strings_and_ends_in_eos(tmp_path, plain_tok):
    rows = [{"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}]
    chosen, rejected = rows_of(prep(tmp_path, plain_tok, rows, "preference").train)[0]
    assert decoded(plain_tok, chosen) == ("Q: 2+2?\nA: 4" + EOS, " 4" + EOS)
    assert decoded(plain_tok, rejected) == ("Q: 2+2?\nA: 5" + EOS, " 5" + EOS)
    messages = [{"prompt": chat(("user", "hi")), "chosen": "a", "rejected": "b"}]
    with pytest.raises(UserError, match=r"line 1: chat messages need a tokenizer with a chat template"):
        prep(tmp_path, plain_tok, messages, "preference", name="m.jsonl")


def test_truncation_counts_pairs_and_drops_a_pair_whose_prompt_fills_max_length(tmp_path, plain_tok):
    rows = [
        {"prompt": "x" * 30, "chosen": "a", "rejected": "b"},  # nothing of either answer left
        {"prompt": "q" * 18, "chosen": "short", "rejected": "y" * 30},  # the rejected answer cut
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ]
    prepared = prep(tmp_path, plain_tok, rows, "preference", max_length=24)
    assert len(prepared.train) == 2 and prepared.train.num_dropped == 1 and prepared.num_truncated == 2
    assert prepared.train.lengths == [24, 24, 3, 3]  # prompt + answer + EOS, cut at 24
    assert "train: 2 pairs, 2 cut to max_length, 1 skipped" in prepared.describe()


def test_pairs_collate_chosen_rows_first(tmp_path, tok):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad answer {i}"} for i in range(3)]
    split = prep(tmp_path, tok, rows, "preference").train
    batch = collate([split[0], split[1], split[2]], pad_id=0)
    assert batch["input_ids"].shape[0] == 6
    texts = [
        tok.decode(ids[mask.bool()])
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    assert [("good" in t, "bad" in t) for t in texts] == [(True, False)] * 3 + [(False, True)] * 3


def test_kto_rows_carry_their_label_and_a_mismatched_row(tmp_path, tok):
    rows = [
        {"prompt": "p0", "completion": "c0", "label": True},
        {"prompt": "p1", "completion": chat(("assistant", "c1")), "label": False},
        {"prompt": "p2", "completion": "c2", "label": True},
    ]
    split = prep(tmp_path, tok, rows, "kto").train
    assert split.desirable.tolist() == [True, False, True]
    for i, (answer, mismatched) in enumerate(rows_of(split)):
        assert decoded(tok, answer)[1] == f"c{i}{END}"
        assert decoded(tok, mismatched)[1] == f"c{(i - 1) % 3}{END}"  # the row before's answer
        assert f"p{i}" in decoded(tok, mismatched)[0]  # after this row's prompt
    batch = collate([split[0], split[1]], pad_id=0)
    assert batch["desirable"].tolist() == [True, False] and batch["kl_input_ids"].shape[0] == 2
    refused(
        tmp_path, tok, [{"prompt": "p", "completion": "c", "label": "yes"}], "kto", r"line 1: column `label`"
    )


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        (
            {"prompt": "q", "chosen": 3, "rejected": "b"},
            r"column `chosen`: expected a string or a list of messages",
        ),
        (
            {"prompt": "q", "chosen": chat(("user", "a")), "rejected": "b"},
            r"column `chosen`: no assistant message",
        ),
        (
            {"prompt": {"q": 1}, "chosen": "a", "rejected": "b"},
            r"column `prompt`: expected a string or a list",
        ),
        (
            {"prompt": "q", "chosen": "a"},
            r"line 2: column `rejected`: expected a string or a list of messages, got None",
        ),
    ],
)
def test_malformed_preference_rows(tmp_path, tok, row, pattern):
    refused(tmp_path, tok, [{"prompt": "q", "chosen": "a", "rejected": "b"}, row], "preference", pattern)


# --------------------------------------------------------------------------------------------------
# chat shapes, roles and columns

CONVERSATION = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")]


def test_sharegpt_rows_are_the_openai_rows(tmp_path, tok):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"conversations": [{"from": names[r], "value": c} for r, c in CONVERSATION]}]
    openai = [{"messages": chat(*CONVERSATION)}]
    assert list(prep(tmp_path, tok, sharegpt, "chat", name="s.jsonl").train) == list(
        prep(tmp_path, tok, openai, "chat", name="o.jsonl").train
    )


def test_roles_and_message_keys_are_mapped(tmp_path, tok):
    rows = [{"dialog": [{"speaker": "narrator", "text": "Be brief."}, {"speaker": "me", "text": "Hi"}]}]
    rows[0]["dialog"].append({"speaker": "bot", "text": "Hello!"})
    mapped = prep(
        tmp_path,
        tok,
        rows,
        "chat",
        name="m.jsonl",
        columns={"messages": "dialog", "role": "speaker", "content": "text"},
        roles={"narrator": "system", "me": "user", "bot": "assistant"},
    )
    assert list(mapped.train) == list(prep(tmp_path, tok, [{"messages": chat(*CONVERSATION)}], "chat").train)
    refused(
        tmp_path,
        tok,
        [{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}],
        "chat",
        r"line 1: column `conversations`, message 2: unknown role `bot`; "
        r"known roles: system, user, assistant, "
        r"tool, human, gpt; map it .* data.roles: \{bot: assistant\}",
    )


def test_openai_weight_zero_turns_and_text_parts(tmp_path, tok):
    messages = chat(("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"))
    messages[1]["weight"] = 0
    messages.append(
        {"role": "assistant", "content": [{"type": "text", "text": "See "}, {"type": "text", "text": "you."}]}
    )
    (row,) = prep(tmp_path, tok, [{"messages": messages}], "chat").train
    assert decoded(tok, row)[1] == "See you." + END


@pytest.mark.parametrize(
    ("fmt", "row", "renames"),
    [
        ("text", {"text": "hello"}, {"text": "body"}),
        (
            "instruction",
            {"instruction": "Say hi", "input": "now", "output": "hi"},
            {"instruction": "task", "input": "ctx", "output": "answer"},
        ),
        ("chat", {"messages": chat(("user", "Hi"), ("assistant", "Hello!"))}, {"messages": "turns"}),
        (
            "preference",
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "question", "chosen": "good", "rejected": "bad"},
        ),
        (
            "kto",
            {"prompt": "q", "completion": "a", "label": True},
            {"prompt": "question", "completion": "answer", "label": "ok"},
        ),
        (
            "tokenized",
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": "ids", "labels": "targets"},
        ),
        (
            "segments",
            {"segments": [{"text": "q ", "label": False}, {"text": "a", "label": True}]},
            {"segments": "parts"},
        ),
    ],
)
def test_columns_rename_every_format(tmp_path, tok, fmt, row, renames):
    renamed = {renames.get(k, k): v for k, v in row.items()}
    plain = prep(tmp_path, tok, [row], fmt, name="plain.jsonl").train
    mapped = prep(tmp_path, tok, [renamed], fmt, name="renamed.jsonl", columns=renames).train
    assert list(mapped) == list(plain)
    missing = {k: "nowhere" for k in renames}
    pattern = r"no column `nowhere` \(data\.columns\.\w+\); its columns: "
    refused(tmp_path, tok, [row], fmt, pattern, columns=missing)


# --------------------------------------------------------------------------------------------------
# tokenized rows and segments


def test_tokenized_rows_pass_through(tmp_path, tok):
    rows = [
        {"input_ids": [1, 40, 41, 42, 2]},
        {"input_ids": [40, 41, 42, 43], "labels": [-100, -100, 42, 43]},
    ]
    first, second = prep(tmp_path, tok, rows, "tokenized").train
    assert first["input_ids"] == [1, 40, 41, 42, 2] and first["labels"] == [1, 40, 41, 42, 2]
    assert second["input_ids"] == [40, 41, 42, 43] and second["labels"] == [-100, -100, 42, 43]
    cut = prep(
        tmp_path, tok, [{"input_ids": list(range(3, 40))}], "tokenized", name="long.jsonl", max_length=16
    )
    assert cut.num_truncated == 1 and cut.train[0]["input_ids"] == list(range(3, 19))


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ({"input_ids": "1 2 3"}, r"column `input_ids`: expected a non-empty list of token ids"),
        ({"input_ids": [1, 2.5]}, r"column `input_ids`: item 1 is 2.5, not a token id"),
        ({"input_ids": [1, 2], "labels": [2]}, r"column `labels`: 1 labels for 2 input_ids"),
        (
            {"input_ids": [5, 6], "labels": [5, 9]},
            r"column `labels`: item 1 is 9: a label is its token's own id",
        ),
        (
            {"input_ids": [5, 6000]},
            r"line 2: token id 6000 is not in the tokenizer's vocabulary \(ids 0..260\)",
        ),
    ],
)
def test_malformed_tokenized_rows(tmp_path, tok, row, pattern):
    good = {"input_ids": [5, 6, 7]}
    data = DataSection(train=write(tmp_path / "bad.jsonl", [good, row]), format="tokenized", validation=None)
    if "vocabulary" not in pattern:  # the vocabulary needs the tokenizer: known only when preparing
        with pytest.raises(UserError, match=pattern):
            check_data_source(data)
    with pytest.raises(UserError, match=pattern):
        prepare_data(data, tok, "causal-lm", 0, cache_dir=tmp_path / "cache")


def test_segments_are_tokenized_piece_by_piece_with_nothing_added(tmp_path, tok):
    pieces = [
        {"text": "<|im_start|>user\nHi<|im_end|>\n", "label": False},
        {"text": "Hello", "label": True},
        {"text": " there", "label": False},
        {"text": "!</s>", "label": True},
    ]
    (row,) = prep(tmp_path, tok, [{"segments": pieces}], "segments").train
    parts = [tok(p["text"], add_special_tokens=False)["input_ids"] for p in pieces]
    assert row["input_ids"] == [t for part in parts for t in part]  # no BOS, no EOS added
    assert decoded(tok, row)[1] == "Hello!</s>"
    assert row["input_ids"][:1] == [tok.convert_tokens_to_ids("<|im_start|>")]  # special tokens as written
    refused(
        tmp_path,
        tok,
        [{"segments": [{"text": "a", "label": "yes"}]}],
        "segments",
        r"line 1: column `segments`, segment 1",
    )
