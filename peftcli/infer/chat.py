"""`peft chat RUN_DIR`: talk to a run, the reply streamed token by token, the conversation kept.

Each turn renders the whole conversation through the chat template (as training rendered it) and continues
it greedily (or sampled) until the end-of-turn token. Lines typed are the user's turns; ``/reset`` forgets
the conversation, ``/exit`` (or end of input, or Ctrl-C at the prompt) ends it. Ctrl-C while a reply is
being written stops that reply and drops the turn. When the conversation no longer fits the model's
context, the oldest turns are dropped. Piped input works the same way: one line per turn, each reply on
its own line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from peftcli.errors import UserError
from peftcli.infer.generate import continue_ids
from peftcli.infer.load import load_for_inference
from peftcli.infer.prompt import encode_chat, stop_ids


def run_chat(
    run_dir: str | Path,
    lines: Iterator[str],
    write: Callable[[str], None],
    prompt: Callable[[], None] = lambda: None,
    max_new_tokens: int = 256,
    system: str | None = None,
    base: str | None = None,
    sampling: dict | None = None,
) -> list[dict]:
    """Chat until `lines` ends; `write` gets the reply's pieces, `prompt()` is called before each turn is
    read. Returns the conversation (messages) as it stood at the end."""
    model, tokenizer, info = load_for_inference(run_dir, base, fold=True)
    if info.task != "causal-lm":
        raise UserError(f"{info.run_dir} holds a {info.task} adapter: use `peft predict` to classify text")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{info.run_dir}: the tokenizer has no chat template; use `peft generate --raw` instead"
        )
    stop = stop_ids(tokenizer, "chat")
    limit = _context_limit(model, info.max_length)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        prompt()
        line = next(lines, None)
        if line is None:
            return messages
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            return messages
        if line.strip() == "/reset":
            del messages[1 if system else 0 :]
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        input_ids = _fit(tokenizer, messages, limit - max_new_tokens, keep=1 if system else 0)
        try:
            reply_ids = continue_ids(
                model, tokenizer, input_ids.to(info.device), max_new_tokens, stop, sampling, write
            )
        except KeyboardInterrupt:
            messages.pop()
            write("\n")
            continue
        write("\n")
        messages.append(
            {"role": "assistant", "content": tokenizer.decode(reply_ids, skip_special_tokens=True).strip()}
        )


def _context_limit(model, max_length: int | None) -> int:
    """Tokens the conversation may take: the model's positions (the run's max_length is what it was
    trained on, not a limit)."""
    config = model.config.get_text_config() if hasattr(model, "config") else None
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(positions or max_length or 2048)


def _fit(tokenizer, messages: list[dict], budget: int, keep: int):
    """The conversation's ids, dropping the oldest turns (after the `keep` leading system message) while it
    is longer than `budget`; the newest user turn always stays."""
    while True:
        input_ids, _ = encode_chat(tokenizer, messages)
        if input_ids.shape[1] <= max(budget, 1) or len(messages) <= keep + 1:
            return input_ids
        del messages[keep : keep + 2]  # one user turn and its reply
