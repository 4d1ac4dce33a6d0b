"""Rendering a row (as data/rows.py reads it) as text plus the character spans that are targets.

    text            the whole text is a target
    instruction     through the chat template as one user turn and one assistant turn where the tokenizer
                    has one, else PLAIN_PROMPT + output; the output is the target
    chat            through the chat template; every assistant turn (with its end-of-turn token) is a target,
                    but those marked weight 0
    preference, kto prompt + one answer (chosen, rejected or the completion), through the chat template where
                    the tokenizer has one (a string prompt is a user turn, a string answer an assistant turn),
                    else the two strings joined; only the answer's assistant turns are targets, whatever
                    data.train_on_inputs says: they are what the log-probabilities compare

With data.train_on_inputs the whole rendered text is a target (text, instruction, chat). Classification rows
are not rendered: their text is tokenized as it is and the class id is the label; segments are tokenized
piece by piece (tokenize.py), and tokenized rows need nothing. Tokenizing the text and marking the tokens
that overlap a span is tokenize.py's job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftcli.errors import UserError

if TYPE_CHECKING:
    from peftcli.recipe import DataSection

PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"  # without a chat template
PLAIN_INPUT = "### Input:\n{input}\n\n"

Spans = list[tuple[int, int]]  # [start, end) character ranges of target text


def uses_template(data: DataSection, tokenizer) -> bool:
    """Whether the format's rows go through the chat template (which writes its own BOS and end-of-turn
    tokens, so the tokenizer adds none)."""
    if data.format == "chat":
        return True
    return data.format in ("instruction", "preference", "kto") and bool(tokenizer.chat_template)


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


def _render_chat(
    messages: list[dict], tokenizer, train_on_inputs: bool, where: str, first_target: int = 0
) -> tuple[str, Spans]:
    """Render through the chat template; the targets are the assistant turns from messages[first_target] on,
    but those marked weight 0 (OpenAI's fine-tuning files mark turns not to learn that way).

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
        if message["role"] != "assistant" or i < first_target or message.get("weight", 1) == 0:
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


def render_row(row: dict, data: DataSection, tokenizer, where: str) -> tuple[str, Spans] | None:
    """A text, instruction or chat row -> (text, target spans), or None when it has nothing to learn."""
    if data.format == "text":
        text = row["text"]
        return (text, [(0, len(text))]) if text.strip() else None
    if data.format == "chat":
        return _render_chat(row["messages"], tokenizer, data.train_on_inputs, where)
    instruction, extra, output = row["instruction"], row["input"].strip(), row["output"]
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


def render_answer(
    prompt: str | list[dict], answer: str | list[dict], tokenizer, where: str
) -> tuple[str, Spans]:
    """A prompt and one answer (preference, kto) -> (text, the answer's target spans).

    With a chat template the conversation is rendered once, prompt and answer together, so the answer's
    tokens are those the model sees after this very prompt; a string prompt is one user turn, a string
    answer one assistant turn. Without one, both must be strings and are joined as they are.
    """
    if tokenizer.chat_template:
        history = (
            prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}] if prompt else []
        )
        turns = answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
        return _render_chat(history + turns, tokenizer, False, where, first_target=len(history))
    if isinstance(prompt, list) or isinstance(answer, list):
        raise UserError(f"{where}: chat messages need a tokenizer with a chat template; this one has none")
    return prompt + answer, [(len(prompt), len(prompt) + len(answer))]


def probe_pair(row: dict, data_format: str, words: int = 12) -> tuple[str, str] | None:
    """(prompt, reference answer) of a row as data/rows.read_row gives it, as a model would be asked it after
    training: a chat's first user turn and the assistant's answer to it; an instruction (with its input) and
    its output; a text's first `words` words (at most half) and the rest; a preference row's string prompt and
    chosen answer. None when the row has no such pair."""
    if data_format == "chat":
        messages = row["messages"]
        for turn, answer in zip(messages, messages[1:], strict=False):
            if turn["role"] == "user" and answer["role"] == "assistant" and turn["content"].strip():
                return turn["content"], answer["content"].strip()
        return None
    if data_format == "instruction":
        instruction, extra, output = (row[k].strip() for k in ("instruction", "input", "output"))
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return (prompt, output) if prompt and output else None
    if data_format == "text":
        split = row["text"].split()
        if len(split) < 2:
            return None
        head = min(words, max(1, len(split) // 2))
        return " ".join(split[:head]), " ".join(split[head:])
    if data_format == "preference":
        prompt, chosen = row["prompt"], row["chosen"]
        if isinstance(prompt, str) and isinstance(chosen, str) and prompt.strip() and chosen.strip():
            return prompt, chosen.strip()
    return None
