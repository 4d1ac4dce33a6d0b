"""What a row of each data.format holds, read and checked without a tokenizer (no torch either: the recipe
reader checks data.columns against it).

    text            text
    instruction     instruction, output (input optional)
    chat            messages: a list of {role, content} (OpenAI's shape; an assistant turn with weight 0 is
                    not trained) or {from, value} (sharegpt's; its column `conversations` is found when there
                    is no `messages`)
    classification  text, label
    preference      prompt, chosen, rejected: each a string or a list of messages, the shared history in the
                    prompt; without a prompt column, chosen and rejected are whole conversations whose shared
                    first messages are the prompt
    kto             prompt, completion (a string or messages), label (true: a desirable answer)
    tokenized       input_ids (token ids, used as they are), labels (optional: the id itself where trained,
                    -100 where not; unshifted, as transformers takes them)
    segments        segments: a list of {text, label}: the pieces joined as they are, no template and no
                    special tokens added; label true marks a piece trained

`data.columns` names the data's own column for a field where it differs ({text: body}; inside messages
{role: speaker, content: text}). Chat roles are system, user, assistant and tool, sharegpt's human and gpt,
and whatever data.roles maps (an unknown role is an error, not a row quietly dropped). Every fault names the
source, the row (in JSON Lines its line) and the column.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftcli.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from peftcli.recipe import DataSection

IGNORE_INDEX = -100  # transformers' cross-entropy ignore_index: a label that is not a target

# format -> (required fields, optional fields)
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text": (("text",), ()),
    "instruction": (("instruction", "output"), ("input",)),
    "chat": (("messages",), ()),
    "classification": (("text", "label"), ()),
    "preference": (("chosen", "rejected"), ("prompt",)),
    "kto": (("prompt", "completion", "label"), ()),
    "tokenized": (("input_ids",), ("labels",)),
    "segments": (("segments",), ()),
}
FORMATS = tuple(FORMAT_FIELDS)
MESSAGE_FORMATS = ("chat", "preference", "kto")  # their values may be chat messages
MESSAGE_KEYS = ("role", "content")  # renamable inside a message too: data.columns: {role: speaker}
# Another shape's column, found when the data has none of the field's own name (and data.columns names none).
DETECTED = {"messages": ("conversations",)}
CHAT_ROLES = ("system", "user", "assistant", "tool")
KNOWN_ROLES = {**{role: role for role in CHAT_ROLES}, "human": "user", "gpt": "assistant"}  # + sharegpt's


def format_fields(data_format: str) -> tuple[str, ...]:
    """Every name data.columns may map for a format."""
    required, optional = FORMAT_FIELDS.get(data_format, ((), ()))
    return (*required, *optional, *(MESSAGE_KEYS if data_format in MESSAGE_FORMATS else ()))


def as_text(value, where: str) -> str:
    """A text cell: None is empty, a number its str() (CSV columns may read as numbers); a list, a mapping or
    a flag is an error naming `where` (its Python repr is no text anyone meant to train on)."""
    if value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool)):
        return "" if value is None else value if isinstance(value, str) else str(value)
    raise UserError(f"{where}: expected text, got {short(value)}")


def short(value, limit: int = 60) -> str:
    """A repr cut to `limit` characters, for messages about a bad value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_columns(data: DataSection, present: list[str], where: str) -> dict[str, str]:
    """{field: the data's column} for the format's fields found in `present`; a UserError naming the columns
    there are when a required one is missing."""
    required, optional = FORMAT_FIELDS[data.format]
    found = {}
    for field in (*required, *optional):
        named = data.columns.get(field)
        candidates = [named] if named else [field, *DETECTED.get(field, ())]
        column = next((c for c in candidates if c in present), None)
        if column is not None:
            found[field] = column
        elif field in required or named:
            how = (
                f"data.columns.{field}"
                if named
                else f"the {data.format} format's `{field}`; name yours with data.columns: {{{field}: ...}}"
            )
            raise UserError(
                f"{where}: no column `{candidates[0]}` ({how}); its columns: "
                + ", ".join(map(str, present))
                + did_you_mean(candidates[0], present)
            )
    return found


# --------------------------------------------------------------------------------------------------
# Reading one row


def read_row(row: dict, columns: dict[str, str], data: DataSection, where: str) -> dict:
    """The row's values under the format's field names, checked and normalised (messages as {role,
    content}); `where` names the row (`data.train: d.jsonl: line 8`)."""
    values = {field: row.get(column) for field, column in columns.items()}

    def at(field: str) -> str:
        return f"{where}: column `{columns[field]}`"

    return _READERS[data.format](values, at, data)


def chat_messages(value, where: str, data: DataSection) -> list[dict]:
    """A chat cell as a list of {role, content} messages (other keys kept); a UserError naming `where` and
    the message when it is not one."""
    if not (isinstance(value, list) and value):
        raise UserError(f"{where}: expected a list of {{role, content}} messages, got {short(value)}")
    roles = {**KNOWN_ROLES, **data.roles}
    messages = []
    for number, message in enumerate(value, 1):
        at = f"{where}, message {number}"
        if not isinstance(message, dict):
            raise UserError(f"{at}: expected a {{role, content}} message, got {short(message)}")
        # Rows read through datasets get every key any message has, None where absent: look past those.
        role_key = data.columns.get("role") or _present(message, ("role", "from"))
        content_key = data.columns.get("content") or _present(message, ("content", "value"))
        name = message.get(role_key)
        if not isinstance(name, str):
            raise UserError(f"{at}: expected a {{role, content}} message, got {short(message)}")
        if name not in roles:
            raise UserError(
                f"{at}: unknown role `{name}`; known roles: {', '.join(roles)}; map it to one of "
                f"{', '.join(CHAT_ROLES)} with data.roles, e.g. data.roles: {{{name}: assistant}}"
            )
        rest = {k: v for k, v in message.items() if k not in (role_key, content_key) and v is not None}
        content = _content(message.get(content_key), f"{at}: `{content_key}`")
        messages.append({**rest, "role": roles[name], "content": content})
    return messages


def _present(message: dict, keys: tuple[str, ...]) -> str:
    return next((k for k in keys if message.get(k) is not None), keys[0])


def _content(value, where: str) -> str:
    """A message's text: a string, or OpenAI's list of text parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        if all(isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
    raise UserError(f"{where}: expected text (a string or a list of text parts), got {short(value)}")


def _answer(value, where: str, data: DataSection) -> str | list[dict]:
    """A response (chosen, rejected, completion): a string, or messages with an assistant turn in them."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise UserError(f"{where}: expected a string or a list of messages, got {short(value)}")
    messages = chat_messages(value, where, data)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message: nothing to learn")
    return messages


def _prompt(value, where: str, data: DataSection) -> str | list[dict]:
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        return chat_messages(value, where, data) if value else ""
    raise UserError(f"{where}: expected a string or a list of messages, got {short(value)}")


def _preference(values: dict, at, data: DataSection) -> dict:
    if "prompt" in values:
        row = {"prompt": _prompt(values["prompt"], at("prompt"), data)}
        row |= {k: _answer(values[k], at(k), data) for k in ("chosen", "rejected")}
        return row
    chosen, rejected = (values[k] for k in ("chosen", "rejected"))
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise UserError(
            f"{at('chosen')}: without a prompt column, chosen and rejected must be whole conversations "
            "(lists of messages) that share their first messages; name the prompt with data.columns"
        )
    chosen, rejected = (
        chat_messages(chosen, at("chosen"), data),
        chat_messages(rejected, at("rejected"), data),
    )
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    row = {"prompt": chosen[:shared] or "", "chosen": chosen[shared:], "rejected": rejected[shared:]}
    for key in ("chosen", "rejected"):
        if not any(m["role"] == "assistant" for m in row[key]):
            raise UserError(f"{at(key)}: no assistant message after the shared prompt: nothing to learn")
    return row


def _kto(values: dict, at, data: DataSection) -> dict:
    label = values["label"]
    if not isinstance(label, bool):
        raise UserError(f"{at('label')}: expected true (a desirable answer) or false, got {short(label)}")
    return {
        "prompt": _prompt(values["prompt"], at("prompt"), data),
        "completion": _answer(values["completion"], at("completion"), data),
        "label": label,
    }


def _token_ids(value, where: str, allow_ignore: bool = False) -> list[int]:
    if not (isinstance(value, list) and value):
        raise UserError(f"{where}: expected a non-empty list of token ids, got {short(value)}")
    for i, token in enumerate(value):
        if not isinstance(token, int) or isinstance(token, bool) or (token < 0 and not allow_ignore):
            raise UserError(f"{where}: item {i} is {short(token)}, not a token id")
    return value


def _tokenized(values: dict, at, data: DataSection) -> dict:
    ids = _token_ids(values["input_ids"], at("input_ids"))
    labels = values.get("labels")
    if labels is not None:
        labels = _token_ids(labels, at("labels"), allow_ignore=True)
        if len(labels) != len(ids):
            raise UserError(f"{at('labels')}: {len(labels)} labels for {len(ids)} input_ids")
        bad = next(
            (i for i, (t, y) in enumerate(zip(ids, labels, strict=True)) if y not in (t, IGNORE_INDEX)), None
        )
        if bad is not None:
            raise UserError(
                f"{at('labels')}: item {bad} is {labels[bad]}: a label is its token's own id "
                f"({ids[bad]}; unshifted, the model shifts them) or {IGNORE_INDEX} for an untrained token"
            )
    return {"input_ids": ids, "labels": labels}


def _segments(values: dict, at, data: DataSection) -> dict:
    value, where = values["segments"], at("segments")
    if not (isinstance(value, list) and value):
        raise UserError(f"{where}: expected a list of {{text, label}} segments, got {short(value)}")
    pieces = []
    for number, segment in enumerate(value, 1):
        if not (
            isinstance(segment, dict)
            and isinstance(segment.get("text"), str)
            and isinstance(segment.get("label"), bool)
        ):
            raise UserError(
                f"{where}, segment {number}: expected {{text: a string, label: true or false}}, "
                f"got {short(segment)}"
            )
        pieces.append((segment["text"], segment["label"]))
    return {"segments": pieces}


def _instruction(values: dict, at, data: DataSection) -> dict:
    return {
        k: as_text(values.get(k), at(k) if k in values else k) for k in ("instruction", "input", "output")
    }


def _classification(values: dict, at, data: DataSection) -> dict:
    return {"text": as_text(values["text"], at("text")), "label": values["label"]}


_READERS = {
    "text": lambda values, at, data: {"text": as_text(values["text"], at("text"))},
    "instruction": _instruction,
    "chat": lambda values, at, data: {"messages": chat_messages(values["messages"], at("messages"), data)},
    "classification": _classification,
    "preference": _preference,
    "kto": _kto,
    "tokenized": _tokenized,
    "segments": _segments,
}
