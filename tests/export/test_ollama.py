"""The Modelfile's TEMPLATE is the chat template in Ollama's terms: put back together turn by turn it writes
the very text the run's template writes, default system message included; the stops are the end-of-turn
and EOS tokens."""

from __future__ import annotations

import pytest
from tiny import tiny_tokenizer

from peftcli.errors import UserError
from peftcli.export.ollama import chat_pieces, stop_texts, write_modelfile
from peftcli.models.gguf_header import read_header
from peftcli.models.sources import resolve


def smollm2_template() -> str:
    source = resolve("smollm2-135m-instruct")
    return read_header(f"{source.path}/{source.gguf_file}")[0]["tokenizer.chat_template"]


def conversation(system, turns):
    messages = [{"role": "system", "content": system}] if system else []
    for user, reply in turns:
        messages.append({"role": "user", "content": user})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    return messages


@pytest.mark.parametrize("template", ["tiny", "smollm2"])
def test_the_pieces_render_what_the_template_renders(template):
    tokenizer = tiny_tokenizer()
    if template == "smollm2":
        tokenizer.chat_template = smollm2_template()
    pieces = chat_pieces(tokenizer)
    for system in (None, "Be brief."):
        for turns in ([("Hi there", None)], [("Hi", "Hello! How can I help?"), ("Tell me more", None)]):
            expected = tokenizer.apply_chat_template(
                conversation(system, turns), add_generation_prompt=True, tokenize=False
            )
            assert pieces.render(system, turns) == expected
    if template == "smollm2":  # it inserts its own system message when none is given
        assert pieces.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    else:
        assert pieces.default_system is None
    assert pieces.assistant_prefix == "<|im_start|>assistant\n" and pieces.assistant_suffix == "<|im_end|>\n"


def test_modelfile(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = smollm2_template()
    (tmp_path / "m.gguf").write_bytes(b"")
    path = write_modelfile(tmp_path / "ollama", tmp_path / "m.gguf", tokenizer)
    text = path.read_text()
    pieces = chat_pieces(tokenizer)
    assert text.splitlines()[0] == "FROM ../m.gguf"
    assert f'TEMPLATE """{pieces.template()}"""' in text
    assert "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert stop_texts(tokenizer) == ["<|im_end|>", "</s>"]
    assert text.rstrip().endswith('PARAMETER stop "<|im_end|>"\nPARAMETER stop "</s>"')


def test_a_template_without_turns_one_after_another_is_refused():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{{ messages[-1]['content'] }}"  # only the last message
    with pytest.raises(UserError, match="--ollama"):
        chat_pieces(tokenizer)
