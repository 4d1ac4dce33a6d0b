"""tokenizer.py's SavedTokenizer against transformers' tokenizer on the same saved files: the same ids,
text, chat renderings, special ids and prompts (prompt.py) on the packaged SmolLM2 tokenizer and the tiny
ones; files it does not cover go to transformers; generate on a llama run imports no transformers."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import jinja2
import pytest
from tiny import bpe_tokenizer, save_gguf_base, save_lora_run, tiny_tokenizer

from peftcli.infer import run_generate
from peftcli.infer import tokenizer as light
from peftcli.infer.prompt import encode_prompt, stop_ids
from peftcli.models.load import load_tokenizer
from peftcli.models.sources import resolve
from peftcli.runs.adapter import load_saved_tokenizer

TEXTS = [
    "What should I pack for Velmora?",
    "",
    " leading space, trailing space ",
    "tab\tand\nnew  lines\r\n\n",
    "émoji 🙂 中文 Ünïcödé ﬁ",
    "<|im_end|> inside <|im_start|>user and </s><s><pad>",
    "x" * 300,
]
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Où est la gare ?"},
        {"role": "assistant", "content": "À gauche."},
        {"role": "user", "content": "Merci 🙂"},
    ],
]
# what templates in the wild call: loop controls, namespace, tojson, dict, raise_exception, a special token
FEATURES_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
    "{% if loop.index > 3 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "{{ m['role'] | upper }}: {{ m['content'] | tojson }} {{ dict(a=1) | tojson }}\n"
    "{% endfor %}{{ ns.n }}{% if add_generation_prompt %}{{ eos_token }}ASSISTANT:{% endif %}"
)


PADDING = {
    "strategy": "BatchLongest",
    "direction": "Right",
    "pad_to_multiple_of": None,
    "pad_id": 0,
    "pad_type_id": 0,
    "pad_token": "H",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """name -> a dir holding the tokenizer as `peft train` saves it."""
    dirs = {}
    for name, make in {
        "smollm2": lambda: load_tokenizer(resolve("smollm2-135m-instruct")),
        "bytes": tiny_tokenizer,
        "bpe": bpe_tokenizer,
    }.items():
        dirs[name] = tmp_path_factory.mktemp(name)
        make().save_pretrained(dirs[name])
    return dirs


def both(directory):
    """(SavedTokenizer, transformers' tokenizer as a run dir's is loaded) of the files in `directory`."""
    ours = light.load_saved(directory)
    assert ours is not None
    return ours, load_saved_tokenizer(directory)


@pytest.mark.parametrize("name", ["smollm2", "bytes", "bpe"])
def test_same_ids_text_and_chat_as_transformers(saved, name):
    ours, theirs = both(saved[name])
    for text in TEXTS:
        for add in (True, False):
            assert (
                ours(text, add_special_tokens=add)["input_ids"]
                == theirs(text, add_special_tokens=add)["input_ids"]
            )
        for style in ("chat", "instruction", "raw"):
            assert encode_prompt(ours, text, style)[0].equal(encode_prompt(theirs, text, style)[0])
    rng = random.Random(0)
    size = theirs.backend_tokenizer.get_vocab_size()
    for _ in range(100):  # any ids: special ones, bytes that split a character
        ids = [rng.randrange(size) for _ in range(rng.randrange(1, 12))] + rng.sample(
            sorted(ours.all_special_ids), 2
        )
        rng.shuffle(ids)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    for messages in CONVERSATIONS:
        for opened in (True, False):
            assert ours.apply_chat_template(
                messages, add_generation_prompt=opened
            ) == theirs.apply_chat_template(messages, add_generation_prompt=opened, tokenize=False)
    for style in ("chat", "raw"):
        assert stop_ids(ours, style) == stop_ids(theirs, style)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id,
        theirs.eos_token_id,
        theirs.pad_token_id,
    )
    assert ours.all_special_ids == theirs.all_special_ids
    assert ours.chat_template == theirs.chat_template
    assert ours.model_max_length == theirs.model_max_length


def test_template_features_render_as_transformers_renders_them(saved, tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = FEATURES_TEMPLATE
    tokenizer.save_pretrained(tmp_path)
    ours, theirs = both(tmp_path)
    messages = CONVERSATIONS[1] + [{"role": "user", "content": 'quote " and <b>'}]
    for opened in (True, False):
        text = ours.apply_chat_template(messages, add_generation_prompt=opened)
        assert text == theirs.apply_chat_template(messages, add_generation_prompt=opened, tokenize=False)
        assert text.startswith("<s>SYSTEM: ") and text.endswith("3</s>ASSISTANT:" if opened else "3")
    for tokenizer_ in (ours, theirs):
        with pytest.raises(jinja2.TemplateError, match="no tools"):
            tokenizer_.apply_chat_template([{"role": "tool", "content": "x"}])


def test_a_namespace_takes_no_underscore_names_as_in_transformers(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% set ns = namespace(_x=1) %}{{ ns._x }}"
    tokenizer.save_pretrained(tmp_path)
    for tokenizer_ in both(tmp_path):
        with pytest.raises(jinja2.exceptions.SecurityError):
            tokenizer_.apply_chat_template(CONVERSATIONS[0])


def _edit_config(directory, **changes):
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_json(directory, edit):
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change",
    [
        lambda d: _edit_config(d, add_bos_token=True),  # transformers rebuilds the post-processor
        lambda d: _edit_config(d, tokenizer_class="LlamaTokenizer"),
        lambda d: _edit_config(d, clean_up_tokenization_spaces=True),
        lambda d: _edit_config(d, some_new_setting=1),  # a key this module does not know
        lambda d: _edit_config(d, eos_token={"content": "</s>", "lstrip": True, "__type": "AddedToken"}),
        lambda d: _edit_config(d, eos_token="not-a-special-token"),  # transformers would add it
        lambda d: _edit_json(d, lambda j: j.update(post_processor=None)),
        lambda d: _edit_json(d, lambda j: [t.update(special=False) for t in j["added_tokens"]]),
        lambda d: (d / "chat_template.jinja").write_text("{% generation %}{{ messages }}{% endgeneration %}"),
        lambda d: (d / "tokenizer.json").write_text("{not json"),
        lambda d: (d / "tokenizer_config.json").unlink(),
        lambda d: (d / "special_tokens_map.json").write_text('{"eos_token": "<s>"}'),  # an older save
        lambda d: _edit_config(d, chat_template="{{ messages }}"),  # beside chat_template.jinja
        lambda d: _edit_json(d, lambda j: j.update(padding=PADDING)),  # transformers pads with its token
        lambda d: _edit_config(
            d, extra_special_tokens=["<|im_start|>"], additional_special_tokens=["<|im_end|>"]
        ),
        lambda d: _edit_config(d, split_special_tokens=None),  # transformers refuses it
        lambda d: _edit_config(d, padding_side="middle"),  # transformers refuses it
        lambda d: _edit_config(d, model_input_names=["input_ids", "token_type_ids"]),
    ],
    ids=[
        "add_bos_token",
        "llama-class",
        "clean-up-spaces",
        "unknown-key",
        "token-as-dict",
        "token-not-added",
        "no-post-processor",
        "specials-not-special",
        "generation-tag",
        "bad-tokenizer-json",
        "no-config",
        "special-tokens-map",
        "two-templates",
        "json-padding",
        "extra-and-additional",
        "split-null",
        "padding-side",
        "input-names",
    ],
)
def test_what_it_does_not_cover_goes_to_transformers(tmp_path, change):
    tiny_tokenizer().save_pretrained(tmp_path)
    assert light.load_saved(tmp_path) is not None
    change(tmp_path)
    assert light.load_saved(tmp_path) is None


def test_generate_on_a_llama_run_imports_no_transformers(tmp_path, monkeypatch):
    """The point of tokenizer.py (with llama.py): the first token imports nothing of transformers, and the
    answer is the one transformers' tokenizer gives."""
    run = save_lora_run(tmp_path / "run", save_gguf_base(tmp_path / "base.gguf", "llama", "q8_0"))
    code = (
        "import sys; from peftcli.infer import run_generate; "
        f"print(repr(run_generate({str(run)!r}, 'hello', max_new_tokens=6))); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    answer, imported = out.splitlines()[-2:]
    assert imported == "[]"
    monkeypatch.setattr("peftcli.infer.load.load_saved", lambda directory: None)
    assert answer == repr(run_generate(run, "hello", max_new_tokens=6))


def test_without_a_pad_token_the_eos_pads_as_for_transformers(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{{ pad_token }}|{{ eos_token }}|{{ unk_token is defined }}"
    tokenizer.save_pretrained(tmp_path)
    _edit_config(tmp_path, pad_token=None)
    ours, theirs = both(tmp_path)
    assert ours.apply_chat_template(CONVERSATIONS[0]) == "</s>|</s>|False"
    assert theirs.apply_chat_template(CONVERSATIONS[0], tokenize=False) == "</s>|</s>|False"
    assert ours.pad_token_id == theirs.pad_token_id == theirs.eos_token_id


def test_a_truncation_saved_in_tokenizer_json_cuts_nothing_as_in_transformers(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path)
    truncation = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    _edit_json(tmp_path, lambda j: j.update(truncation=truncation))
    ours, theirs = both(tmp_path)
    assert len(ours(TEXTS[0])["input_ids"]) == len(theirs(TEXTS[0])["input_ids"]) == len(TEXTS[0].encode())


def test_a_template_kept_in_tokenizer_config_renders_as_in_transformers(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path)
    template = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    _edit_config(tmp_path, chat_template=template)  # where transformers 4 saved it
    ours, theirs = both(tmp_path)
    assert ours.chat_template == theirs.chat_template == template
    assert ours.apply_chat_template(CONVERSATIONS[1]) == theirs.apply_chat_template(
        CONVERSATIONS[1], tokenize=False
    )


def test_without_a_length_limit_saved_the_limit_is_transformers_default(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path)
    _edit_config(tmp_path, model_max_length=None)
    ours, theirs = both(tmp_path)
    assert ours.model_max_length == theirs.model_max_length


def test_an_old_jinja2_goes_to_transformers(tmp_path, monkeypatch):
    """transformers refuses jinja2 before 3.1.6 (sandbox escapes): so does this module."""
    tiny_tokenizer().save_pretrained(tmp_path)
    monkeypatch.setattr("jinja2.__version__", "3.1.5")
    light._environment.cache_clear()
    light._compile.cache_clear()
    try:
        assert light.load_saved(tmp_path) is None
    finally:
        light._environment.cache_clear()
        light._compile.cache_clear()
