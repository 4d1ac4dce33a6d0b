"""`peft generate`'s fast path: the adapter folded in memory gives the unfolded model's tokens, the text
streams piece by piece into the answer it returns, a chat answer ends at the end-of-turn token, and a GGUF
base is read once, without transformers' GGUF parser."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny import save_bpe_base, save_gguf_base, save_lora_run
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.infer import load_for_inference, run_generate
from peftcli.infer.generate import continue_ids
from peftcli.infer.prompt import encode_prompt, end_of_turn_id, stop_ids


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    return save_lora_run(root / "run", save_bpe_base(root / "base", "llama"))


def test_folded_and_unfolded_models_pick_the_same_tokens(run):
    folded, tokenizer, info = load_for_inference(run, fold=True)
    unfolded, _, plain = load_for_inference(run)
    assert info.folded and not plain.folded
    assert not any("lora" in name for name, _ in folded.named_modules())
    ids, _ = encode_prompt(tokenizer, "hello world", "chat")
    stop = stop_ids(tokenizer, "chat")
    assert continue_ids(folded, tokenizer, ids, 24, stop) == continue_ids(unfolded, tokenizer, ids, 24, stop)


def test_the_answer_streams_in_pieces(run):
    pieces = []
    text = run_generate(run, "what is the capital of France?", max_new_tokens=16, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces).strip() == text
    result = CliRunner().invoke(
        app, ["generate", str(run), "--prompt", "hello world", "--max-new-tokens", "16"]
    )
    assert result.exit_code == 0 and result.stdout.strip() == run_generate(
        run, "hello world", max_new_tokens=16
    )


def test_a_chat_answer_ends_at_the_end_of_turn_token(run):
    """The tiny template ends turns with <|im_end|>, which is not its EOS (</s>): generation stops there."""
    model, tokenizer, _ = load_for_inference(run, fold=True)
    turn_end = end_of_turn_id(tokenizer)
    assert (
        stop_ids(tokenizer, "chat") == [tokenizer.eos_token_id, turn_end]
        and turn_end != tokenizer.eos_token_id
    )
    assert stop_ids(tokenizer, "raw") == [tokenizer.eos_token_id]
    ids, _ = encode_prompt(tokenizer, "hello world", "chat")
    free = continue_ids(model, tokenizer, ids, 12, [])
    # make the third greedy token a stop token: the answer is the two before it
    assert continue_ids(model, tokenizer, ids, 12, [free[2]]) == free[:2]


def test_a_gguf_base_is_read_once_without_transformers_gguf_parser(tmp_path, monkeypatch):
    base = save_gguf_base(tmp_path / "base.gguf", "llama", "q8_0")
    run = save_lora_run(tmp_path / "run", base)
    expected = run_generate(run, "hello world", max_new_tokens=8)

    def parsed(*args, **kwargs):
        raise AssertionError("transformers parsed the GGUF file")

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", parsed)
    with torch.no_grad():
        assert run_generate(run, "hello world", max_new_tokens=8) == expected


def test_a_packed_gguf_base_is_decoded_dense_with_the_adapter_folded(tmp_path, monkeypatch):
    """A packed base would dequantize every weight on every generated token: where the dense copy fits, it is
    dequantized once and the LoRA folded in, and picks the packed model's tokens; where it would not fit,
    the model stays packed and unfolded, with a note."""
    from peftcli.infer import load as infer_load
    from peftcli.quant import convert

    base = save_gguf_base(tmp_path / "base.gguf", "llama", "q8_0")
    run = save_lora_run(tmp_path / "run", base)
    packed, tokenizer, plain = load_for_inference(run)
    assert convert.describe(packed) and not plain.folded
    dense, _, info = load_for_inference(run, fold=True)
    assert info.folded and not convert.describe(dense)
    assert not any("lora" in name for name, _ in dense.named_modules())
    ids, _ = encode_prompt(tokenizer, "hello world", "text")
    assert continue_ids(dense, tokenizer, ids, 8, []) == continue_ids(packed, tokenizer, ids, 8, [])

    monkeypatch.setattr(infer_load, "_available_bytes", lambda: 1000)
    kept, _, info = load_for_inference(run, fold=True)
    assert convert.describe(kept) and not info.folded


def test_a_gguf_base_cut_short_is_named_as_such(tmp_path):
    """A partial copy of the base: one line saying the file ends early (not another reader's puzzled error),
    exit 2, no traceback."""
    base = save_gguf_base(tmp_path / "base.gguf", "llama", "q8_0")
    run = save_lora_run(tmp_path / "run", base)
    base.write_bytes(base.read_bytes()[:-100])
    result = CliRunner().invoke(app, ["generate", str(run), "--prompt", "hello"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "base.gguf: the tensor data runs past the end of the file" in result.output


@pytest.mark.parametrize("reader", ["tokenizer.py", "transformers"])
def test_a_chat_template_that_refuses_the_prompt_is_one_line(run, tmp_path, monkeypatch, reader):
    """raise_exception() in the run's template (one that wants a system turn, say): its message, exit 2, no
    traceback; the same through transformers' tokenizer."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "chat_template.jinja").write_text("{{ raise_exception('this template wants a system turn') }}")
    if reader == "transformers":
        monkeypatch.setattr("peftcli.infer.load.load_saved", lambda directory: None)
    result = CliRunner().invoke(app, ["generate", str(copy), "--prompt", "hello"])
    assert result.exit_code == 2, result.output
    assert "the run's chat template refused the prompt: this template wants a system turn" in result.output
    assert "--raw" in result.output


@pytest.mark.parametrize("damage", ["{}", '{"version": "1.0", "model": {', ""])
def test_a_damaged_saved_tokenizer_is_one_line(run, tmp_path, damage):
    """tokenizer.json that is no tokenizer (valid JSON or not): which file, exit 2, no traceback."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "tokenizer.json").write_text(damage)
    result = CliRunner().invoke(app, ["generate", str(copy), "--prompt", "hello"])
    assert result.exit_code == 2, result.output
    assert f"cannot load the tokenizer saved in {copy}" in result.output
