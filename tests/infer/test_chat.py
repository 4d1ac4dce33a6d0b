"""`peft chat` with piped input: each line a turn, each reply the greedy continuation of the whole
conversation through the chat template; /reset forgets; an interrupted reply drops its turn; end of input
and Ctrl-C at the prompt end the chat cleanly."""

from __future__ import annotations

import pytest
import torch
from tiny import save_bpe_base, save_lora_run
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.errors import UserError
from peftcli.infer import chat, load_for_inference, run_generate
from peftcli.infer.generate import continue_ids
from peftcli.infer.prompt import encode_chat, stop_ids

TOKENS = 10


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return save_lora_run(root / "run", save_bpe_base(root / "base", "llama"))


def replies_by_hand(run, turns: list[str]) -> str:
    """What the chat prints: each reply (greedy on [user, assistant, ..., user] rendered by the template, the
    replies kept stripped) on its own line, as streamed (leading whitespace dropped)."""
    model, tokenizer, _ = load_for_inference(run, fold=True)
    messages, replies = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        ids, _ = encode_chat(tokenizer, messages)
        with torch.no_grad():
            new = continue_ids(model, tokenizer, ids, TOKENS, stop_ids(tokenizer, "chat"))
        reply = tokenizer.decode(new, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply.strip()})
        replies.append(reply.lstrip() + "\n")
    return "".join(replies)


def test_piped_turns_keep_the_conversation(run):
    turns = ["hello world", "what is the capital of France?", "the quick brown fox"]
    result = CliRunner().invoke(
        app, ["chat", str(run), "--max-new-tokens", str(TOKENS)], input="\n".join(turns) + "\n"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == replies_by_hand(run, turns)
    # the history matters: the second turn alone is answered otherwise
    alone = replies_by_hand(run, [turns[0]]) + replies_by_hand(run, [turns[1]])
    assert not result.stdout.startswith(alone)
    # a first turn is what `peft generate` answers
    assert replies_by_hand(run, turns[:1]).strip() == run_generate(run, turns[0], max_new_tokens=TOKENS)


def test_reset_forgets_and_exit_ends(run):
    turns = "hello world\n/reset\nwhat is the capital of France?\n/exit\nnever read\n"
    result = CliRunner().invoke(app, ["chat", str(run), "--max-new-tokens", str(TOKENS)], input=turns)
    assert result.exit_code == 0, result.output
    assert result.stdout == replies_by_hand(run, ["hello world"]) + replies_by_hand(
        run, ["what is the capital of France?"]
    )


def test_an_interrupted_reply_drops_its_turn(run, monkeypatch):
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return continue_ids(*args, **kwargs)

    monkeypatch.setattr(chat, "continue_ids", interrupted_once)
    written = []
    messages = chat.run_chat(run, iter(["first", "hello world"]), written.append, max_new_tokens=TOKENS)
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hello world"]
    assert "".join(written) == "\n" + replies_by_hand(run, ["hello world"])


def test_ctrl_c_at_the_prompt_ends_cleanly(run, monkeypatch):
    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", lambda prompt="": interrupt())
    result = CliRunner().invoke(app, ["chat", str(run)])
    assert result.exit_code == 0 and "Traceback" not in result.output


def test_a_run_without_a_chat_template_is_refused(run, tmp_path):
    from transformers import AutoTokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((run / name).read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(run)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(bare)
    with pytest.raises(UserError, match="no chat template"):
        chat.run_chat(bare, iter([]), print)
