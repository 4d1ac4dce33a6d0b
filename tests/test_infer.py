"""`peft generate` / `peft predict` against generation and classification done by hand on base + adapter."""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
import yaml
from tiny import save_tiny, tiny_config, tiny_model, tiny_tokenizer
from transformers import AutoModel
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.errors import UserError
from peftcli.infer import load_for_inference, run_generate, run_predict
from peftcli.methods import METHODS, Context, make_config
from peftcli.models import load as models
from peftcli.models.sources import resolve
from peftcli.runs import adapter as checkpoint

PROMPT = "Say hi"
LORA = make_config("lora", rank=4, alpha=8.0)


def randomise(model: torch.nn.Module, seed: int = 3, scale: float = 1.0) -> None:
    """Large random adapter weights, so that an adapter that was not loaded changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def make_run(
    directory,
    base_dir,
    task: str,
    data_format: str | None,
    labels: list[str] | None = None,
    with_tokenizer: bool = True,
):
    """A `peft train`-like output dir: a random LoRA adapter (+ tokenizer, recipe.yaml, labels.json)."""
    model = models.load_model(resolve(str(base_dir)), task, label_names=labels)
    model = METHODS["lora"].inject(model, LORA, Context(task))
    randomise(model)
    checkpoint.save_adapter(model, LORA, task, str(base_dir), directory, label_names=labels)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(directory)
    if data_format:
        recipe = {
            "model": {"name": str(base_dir), "task": task},
            "method": {"name": "lora"},
            "data": {"train": "data.jsonl", "format": data_format, "max_length": 64},
        }
        (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return directory


def reference(base_dir, run_dir, task: str, labels: list[str] | None = None):
    """Base + adapter loaded independently of peftcli.generate."""
    model = models.load_model(resolve(str(base_dir)), task, label_names=labels)
    model, _ = checkpoint.load_adapter(model, run_dir)
    return model.eval()


@torch.no_grad()
def greedy(model, ids: list[int], max_new_tokens: int) -> str:
    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return tiny_tokenizer().decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def chatml_ids(prompt: str) -> list[int]:
    tok = tiny_tokenizer()
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("base") / "llama", "llama", "causal-lm")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, llama_base):
    return make_run(tmp_path_factory.mktemp("runs") / "chat", llama_base, "causal-lm", "chat")


# --------------------------------------------------------------------------------------------------
# Causal LM


def test_greedy_equals_base_plus_adapter_by_hand(chat_run, llama_base):
    text = run_generate(chat_run, PROMPT, max_new_tokens=12)
    expected = greedy(reference(llama_base, chat_run, "causal-lm"), chatml_ids(PROMPT), 12)
    assert isinstance(text, str) and text
    assert text == expected
    # the adapter matters: the base model alone continues differently
    base_only = models.load_model(resolve(str(llama_base)), "causal-lm")
    assert greedy(base_only, chatml_ids(PROMPT), 12) != expected


def test_text_runs_and_raw_skip_the_chat_template(tmp_path, llama_base, chat_run):
    text_run = make_run(tmp_path / "text", llama_base, "causal-lm", "text")
    raw_ids = tiny_tokenizer()(PROMPT)["input_ids"]
    model = reference(llama_base, text_run, "causal-lm")
    assert run_generate(text_run, PROMPT, max_new_tokens=10) == greedy(model, raw_ids, 10)
    # an empty raw prompt starts from the BOS token instead of failing inside generate()
    assert run_generate(text_run, "", max_new_tokens=6) == greedy(model, [tiny_tokenizer().bos_token_id], 6)
    # --raw on a chat run: the same adapter weights, so the hand result uses the chat run's adapter
    chat_model = reference(llama_base, chat_run, "causal-lm")
    assert run_generate(chat_run, PROMPT, max_new_tokens=10, raw=True) == greedy(chat_model, raw_ids, 10)
    assert greedy(chat_model, raw_ids, 10) != greedy(chat_model, chatml_ids(PROMPT), 10)


def test_instruction_run_without_a_template_uses_the_plain_prompt(tmp_path, llama_base):
    run = make_run(tmp_path / "instr", llama_base, "causal-lm", "instruction", with_tokenizer=False)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(run)
    ids = tokenizer(f"### Instruction:\n{PROMPT}\n\n### Response:\n")["input_ids"]
    model = reference(llama_base, run, "causal-lm")
    assert run_generate(run, PROMPT, max_new_tokens=8) == greedy(model, ids, 8)


def test_sampling_is_seeded(chat_run):
    first = run_generate(chat_run, PROMPT, max_new_tokens=16, sample=True, temperature=1.0, seed=1)
    again = run_generate(chat_run, PROMPT, max_new_tokens=16, sample=True, temperature=1.0, seed=1)
    other = run_generate(chat_run, PROMPT, max_new_tokens=16, sample=True, temperature=1.0, seed=2)
    assert first == again
    assert first != other
    greedy_text = run_generate(chat_run, PROMPT, max_new_tokens=16)
    assert first != greedy_text
    # temperature 0 means no randomness: greedy, rather than transformers' error
    assert run_generate(chat_run, PROMPT, max_new_tokens=16, sample=True, temperature=0.0) == greedy_text


def test_load_for_inference_reports_what_it_loaded(chat_run, llama_base):
    model, tokenizer, info = load_for_inference(chat_run)
    assert info.task == "causal-lm" and info.method == "lora" and info.data_format == "chat"
    assert info.base == str(llama_base) and info.max_length == 64
    assert not model.training
    assert tokenizer.chat_template
    saved = checkpoint.AdapterDir(chat_run).state
    loaded = METHODS["lora"].adapter_state(model)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_bare_hf_peft_adapter_without_tokenizer(tmp_path, llama_base):
    """An adapter saved by HF PEFT: no tokenizer, no recipe, and no base model name."""
    base = tiny_model("llama", "causal-lm")  # llama_base's weights, with no name_or_path to save
    hf = peft.get_peft_model(
        base, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    )
    randomise(hf)
    hf.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    with torch.no_grad():
        input_ids = torch.tensor([chatml_ids(PROMPT)])
        out = hf.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        )
    expected = tiny_tokenizer().decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()

    with pytest.raises(UserError, match="pass --base"):
        run_generate(tmp_path / "hf", PROMPT, max_new_tokens=10)
    # the base's tokenizer has a chat template, and a bare dir has no recipe to say otherwise
    assert run_generate(tmp_path / "hf", PROMPT, max_new_tokens=10, base=str(llama_base)) == expected


def test_missing_base_model_is_a_clean_error(tmp_path, llama_base):
    run = make_run(tmp_path / "run", llama_base, "causal-lm", "chat")
    config = json.loads((run / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (run / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"moved-away.*adapter_config\.json.*pass --base"):
        run_generate(run, PROMPT)
    assert run_generate(run, PROMPT, max_new_tokens=4, base=str(llama_base))


def test_not_an_adapter_dir(tmp_path):
    with pytest.raises(UserError, match="not found"):
        run_generate(tmp_path / "nope", PROMPT)
    with pytest.raises(UserError, match="not an adapter directory"):
        run_predict(tmp_path, "text")


def test_predict_refuses_a_causal_lm_adapter(chat_run):
    with pytest.raises(UserError, match="peft generate"):
        run_predict(chat_run, "some text")


# --------------------------------------------------------------------------------------------------
# Sequence classification


@torch.no_grad()
def by_hand(model, text: str) -> tuple[int, float]:
    ids = torch.tensor([tiny_tokenizer()(text)["input_ids"]])
    probs = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].softmax(-1)
    return int(probs.argmax()), float(probs.max())


LABELS = ["neg", "neutral", "pos"]


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A decoder classifier (pools the last token) on a base whose head already has 3 labels."""
    root = tmp_path_factory.mktemp("cls")
    base = save_tiny(root / "llama-cls", "llama", "sequence-classification", num_labels=3)
    run = make_run(root / "run", base, "sequence-classification", "classification", LABELS)
    return base, run


def test_decoder_classifier_predicts_argmax(cls_run):
    base, run = cls_run
    model = reference(base, run, "sequence-classification", LABELS)
    for text in ["good film", "what a waste of two hours"]:
        index, prob = by_hand(model, text)
        assert run_predict(run, text) == f"{LABELS[index]} (p={prob:.2f})"
    assert run_generate(run, "meh") == run_predict(run, "meh")  # generate on a classifier predicts


def test_headless_base_gets_a_head_of_the_adapter_size(tmp_path):
    """A backbone with no classifier (like all-MiniLM), a 2-label adapter, with and without labels.json."""
    base = tmp_path / "bert"
    torch.manual_seed(0)
    AutoModel.from_config(tiny_config("bert")).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    labels = ["ham", "spam"]
    run = make_run(tmp_path / "run", base, "sequence-classification", "classification", labels)
    model = reference(base, run, "sequence-classification", labels)
    texts = ["win money now", "see you at lunch"]
    for text in texts:
        index, prob = by_hand(model, text)
        assert run_predict(run, text) == f"{labels[index]} (p={prob:.2f})"

    # without labels.json the head size comes from the saved weights; names are the config's defaults
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "labels.json").unlink()
    (bare / "tokenizer.json").unlink()
    (bare / "tokenizer_config.json").unlink()
    _, _, info = load_for_inference(bare)
    assert info.label_names is None
    for text in texts:
        index, prob = by_hand(model, text)
        assert run_predict(bare, text) == f"LABEL_{index} (p={prob:.2f})"


def test_base_with_a_head_of_another_size(tmp_path):
    base = save_tiny(tmp_path / "bert-cls", "bert", "sequence-classification", num_labels=3)
    run = make_run(tmp_path / "run", base, "sequence-classification", "classification", ["a", "b"])
    assert run_predict(run, "text").split(" ")[0] in ("a", "b")


# --------------------------------------------------------------------------------------------------
# Through the command line


def test_cli_generate_and_predict(chat_run, cls_run):
    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(chat_run), "--prompt", PROMPT, "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == run_generate(chat_run, PROMPT, max_new_tokens=12)

    base, run = cls_run
    result = runner.invoke(app, ["predict", str(run), "--text", "good film"])
    assert result.exit_code == 0, result.output
    index, prob = by_hand(reference(base, run, "sequence-classification", LABELS), "good film")
    assert result.stdout == f"{LABELS[index]} (p={prob:.2f})\n"


def test_cli_errors_are_one_line_with_exit_code_2(chat_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(tmp_path / "missing"), "--prompt", "x"])
    assert result.exit_code == 2
    assert "error:" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(app, ["predict", str(chat_run), "--text", "x"])
    assert result.exit_code == 2
    assert "peft generate" in result.stderr
