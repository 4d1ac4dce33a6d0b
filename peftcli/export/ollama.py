"""An Ollama Modelfile beside the GGUF: FROM, TEMPLATE from the chat template, stop parameters.

Ollama writes prompts with Go templates, not Jinja, so the run's chat template is turned into the pieces
around each role's text, found by rendering conversations with marker strings: what comes before and
after a system message, a user message and an assistant reply, and the default system message the template
inserts when none is given (SmolLM2's "You are a helpful AI assistant named SmolLM ..."), which becomes
the Modelfile's SYSTEM. The TEMPLATE is Ollama's per-turn form (``.System``, ``.Prompt``, ``.Response``),
which Ollama repeats for each turn of a conversation. The stop parameters are the end-of-turn and EOS
tokens' texts, so the model stops where `peft generate` stops (the usual fault of exported models).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from peftcli import fileio
from peftcli.errors import UserError
from peftcli.infer.prompt import end_of_turn_id

_S, _U, _A, _U2 = "\x01SYSTEM\x01", "\x01USER\x01", "\x01REPLY\x01", "\x01NEXT\x01"


@dataclass(frozen=True)
class ChatPieces:
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str  # up to the opening of the assistant's turn
    assistant_prefix: str  # the opening of the assistant's turn (the generation prompt)
    assistant_suffix: str
    default_system: str | None

    def render(self, system: str | None, turns: list[tuple[str, str | None]]) -> str:
        """The text Ollama's TEMPLATE (`template()`) makes of a conversation: turns of (user, reply), the
        last reply None (the assistant's turn opened)."""
        system = system if system is not None else self.default_system
        out = f"{self.system_prefix}{system}{self.system_suffix}" if system else ""
        for user, reply in turns:
            out += f"{self.user_prefix}{user}{self.user_suffix}{self.assistant_prefix}"
            if reply is not None:
                out += f"{reply}{self.assistant_suffix}"
        return out

    def template(self) -> str:
        """Ollama's TEMPLATE (Go template syntax) for these pieces."""
        return (
            f"{{{{ if .System }}}}{self.system_prefix}{{{{ .System }}}}{self.system_suffix}{{{{ end }}}}"
            f"{{{{ if .Prompt }}}}{self.user_prefix}{{{{ .Prompt }}}}{self.user_suffix}{{{{ end }}}}"
            f"{self.assistant_prefix}{{{{ .Response }}}}{self.assistant_suffix}"
        )


def chat_pieces(tokenizer) -> ChatPieces:
    """The pieces of the tokenizer's chat template (module docstring); UserError where the template does not
    lay turns out one after another."""

    def render(messages, opened):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=opened, tokenize=False)

    try:
        one = render([{"role": "system", "content": _S}, {"role": "user", "content": _U}], True)
        two = render(
            [
                {"role": "system", "content": _S},
                {"role": "user", "content": _U},
                {"role": "assistant", "content": _A},
                {"role": "user", "content": _U2},
            ],
            True,
        )
        bare = render([{"role": "user", "content": _U}], True)
    except Exception as e:  # the template's own error (e.g. it refuses a system message)
        raise UserError(f"--ollama: the chat template cannot be turned into Ollama's: {e}") from e
    if not all(m in two for m in (_S, _U, _A, _U2)) or not two.startswith(one[: one.index(_U)]):
        raise UserError("--ollama: the chat template does not lay out turns one after another")
    system_prefix, rest = one.split(_S)
    between_system_user, after_user = rest.split(_U)
    user_to_reply, after_reply = two.split(_U)[1].split(_A)
    reply_to_next = after_reply.split(_U2)[0]
    eot_text = _turn_end_text(tokenizer)
    system_suffix, user_prefix = _split_after(between_system_user, eot_text)
    assistant_suffix, next_user_prefix = _split_after(reply_to_next, eot_text)
    user_suffix, assistant_prefix = _split_after(user_to_reply, eot_text)
    if next_user_prefix != user_prefix or not after_user.endswith(assistant_prefix):
        raise UserError("--ollama: the chat template renders turns differently from one to the next")
    default_system = None
    head = bare[: bare.index(_U)]
    if head.startswith(system_prefix) and head.endswith(system_suffix + user_prefix) and head != user_prefix:
        default_system = head[len(system_prefix) : len(head) - len(system_suffix + user_prefix)]
    return ChatPieces(
        system_prefix,
        system_suffix,
        user_prefix,
        user_suffix,
        assistant_prefix,
        assistant_suffix,
        default_system,
    )


def _turn_end_text(tokenizer) -> str | None:
    index = end_of_turn_id(tokenizer)
    return tokenizer.convert_ids_to_tokens(index) if index is not None else None


def _split_after(text: str, marker: str | None) -> tuple[str, str]:
    """(up to and including `marker` and the line breaks after it, the rest); ("", text) without it."""
    if not marker or marker not in text:
        return "", text
    end = text.index(marker) + len(marker)
    while end < len(text) and text[end] == "\n":
        end += 1
    return text[:end], text[end:]


def stop_texts(tokenizer) -> list[str]:
    """The texts Ollama should stop at: the end-of-turn token's and the EOS token's."""
    texts = []
    for index in (end_of_turn_id(tokenizer), tokenizer.eos_token_id):
        if index is not None:
            text = tokenizer.convert_ids_to_tokens(index)
            if text and text not in texts:
                texts.append(text)
    return texts


def write_modelfile(directory: Path, gguf: Path, tokenizer, adapter: Path | None = None) -> Path:
    """directory/Modelfile for `gguf` (the model; with `adapter`, the base and the LoRA on it)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"FROM {_path_from(directory, gguf)}"]
    if adapter is not None:
        lines.append(f"ADAPTER {_path_from(directory, adapter)}")
    if getattr(tokenizer, "chat_template", None):
        pieces = chat_pieces(tokenizer)
        lines.append(f'TEMPLATE """{pieces.template()}"""')
        if pieces.default_system:
            lines.append(f'SYSTEM """{pieces.default_system}"""')
    for text in stop_texts(tokenizer):
        lines.append(f"PARAMETER stop {json.dumps(text)}")
    path = directory / "Modelfile"
    fileio.write_text(path, "\n".join(lines) + "\n")
    return path


def _path_from(directory: Path, target: Path) -> str:
    """`target` as the Modelfile names it: relative to the Modelfile's directory where it can be."""
    try:
        return os.path.relpath(target.resolve(), directory.resolve())
    except ValueError:  # another drive (Windows)
        return str(target.resolve())
