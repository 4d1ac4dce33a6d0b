"""shapes.py and the count from shapes: equal to the model transformers builds, and to injecting for real."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from tiny import tiny_config
from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, RobertaConfig
from transformers.pytorch_utils import Conv1D

from peftcli.count import injected_counts, meta_counts, shape_count
from peftcli.errors import UserError
from peftcli.methods import make_config
from peftcli.models.load import meta_model
from peftcli.models.shapes import NotModelled, config_shapes
from peftcli.models.sources import resolve

TASKS = [None, "sequence-classification"]

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)

# Configs that set what shapes.py reads, some away from the defaults (ties, biases, head_dim, GQA).
CONFIGS = {
    "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=100),
    "gpt2-untied-inner": GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=48, tie_word_embeddings=False),
    "llama-gqa": tiny_config("llama"),
    "llama-biases-tied": LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        vocab_size=100,
        num_labels=5,
    ),
    "mistral": MistralConfig(**SMALL, num_key_value_heads=2),
    "qwen2": Qwen2Config(**SMALL, num_key_value_heads=2),
    "bert": BertConfig(**SMALL, vocab_size=100, architectures=["BertModel"]),  # task None: the bare encoder
    "roberta": RobertaConfig(**SMALL, num_labels=4, type_vocab_size=1, architectures=["RobertaModel"]),
}

# What each method can be asked, options that change its count included.
METHODS = [
    make_config("lora", rank=4),
    make_config("lora", rank=2, target_modules="all-linear"),
    make_config("lora", target_modules=r".*\.1\..*(proj|c_fc|query)"),
    make_config(
        "lora",
        rank=2,
        target_modules="all-linear",
        modules_to_save=["embed_tokens", "wte", "word_embeddings"],
    ),
    make_config("lora", rank=4, use_dora=True),
    make_config("lora", rank=2, target_modules="all-linear", use_dora=True, init="pissa"),
    make_config("prefix-tuning", num_virtual_tokens=5),
    make_config("prefix-tuning", num_virtual_tokens=3, prefix_projection=True),
    make_config("prefix-tuning", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=7),
    make_config("prompt-tuning", num_virtual_tokens=6),
    make_config("adapter"),
    make_config("adapter", placement="houlsby", bottleneck_size=3),
    make_config("adapter", reduction_factor=4, target_modules=["k_proj", "c_attn"]),
    make_config("bitfit"),
    make_config("bitfit", biases=["q_proj", "c_fc"]),
    make_config("ia3"),
    make_config(
        "ia3", target_modules="all-linear", feedforward_modules=r".*(down_proj|mlp\.c_proj|\.output\.dense)"
    ),
    make_config("vera", rank=4),
    make_config("vera", rank=3, target_modules="all-linear", modules_to_save=["embed_tokens", "wte"]),
    make_config("loha", rank=2),
    make_config("loha", rank=3, target_modules="all-linear"),
    make_config("lokr", rank=2),
    make_config("lokr", rank=1, decompose_both=True, decompose_factor=4, target_modules="all-linear"),
    make_config("oft", block_size=8),
    make_config("oft", num_blocks=3, block_share=True, target_modules="all-linear"),
]


def _write(tmp_path, config) -> str:
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def _meta_inventory(model):
    """named_parameters with ties (name -> (first owner's name, numel)) and the linear layers' shapes."""
    first, params = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        params[name] = (first.setdefault(id(p), name), p.numel())
    linears = {}
    for name, m in model.named_modules():
        if isinstance(m, Conv1D):
            linears[name] = tuple(m.weight.shape)
        elif isinstance(m, torch.nn.Linear):
            linears[name] = (m.in_features, m.out_features)
    return params, linears


def _assert_same_model(shapes, model):
    params, linears = _meta_inventory(model)
    assert list(shapes.params.items()) == list(params.items())  # names, ties, sizes and model order
    assert {n: (x.in_features, x.out_features) for n, x in shapes.linears.items()} == linears
    head = model.get_output_embeddings()
    head_names = [n for n, m in model.named_modules() if head is not None and m is head]
    assert [shapes.output_head] == (head_names or [None])
    assert shapes.numel() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral", "qwen2", "bert", "roberta"])
def test_config_defaults_equal_transformers(tmp_path, model_type):
    # A config.json naming only the type (and an encoder's class): every size comes from shapes.py's
    # defaults, which must be the config class's (Llama's are a 6.7B model: cheap on the meta device).
    config = {"model_type": model_type}
    if model_type in ("bert", "roberta"):
        config["architectures"] = ["BertModel" if model_type == "bert" else "RobertaModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    _assert_same_model(config_shapes(str(tmp_path)), meta_model(resolve(str(tmp_path))))


def _assert_counts_as_injecting(path: str, task: str | None) -> None:
    shapes, base = config_shapes(path, task), meta_model(resolve(path), task)
    _assert_same_model(shapes, base)
    checked = 0
    for method in METHODS:
        try:
            expected = injected_counts(copy.deepcopy(base), [method], task)[0]
        except Exception as e:  # a method this model refuses: the shape path must not answer either
            with pytest.raises((NotModelled, UserError)):
                shape_count(shapes, method)
            assert "matches no" in str(e) or "no bias" in str(e), e
            continue
        assert shape_count(shapes, method) == expected, method
        checked += 1
    assert checked >= len(METHODS) - 3


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("key", list(CONFIGS))
def test_shapes_and_counts_equal_the_meta_model(tmp_path, key, task):
    _assert_counts_as_injecting(_write(tmp_path, CONFIGS[key]), task)


def test_every_method_has_a_shape_count():
    from peftcli import methods

    assert methods.METHODS and all(callable(getattr(m, "count", None)) for m in methods.METHODS.values())


def test_architectures_class_decides_the_task(tmp_path):
    config = copy.deepcopy(CONFIGS["llama-gqa"])
    config.architectures = ["LlamaForSequenceClassification"]
    path = _write(tmp_path, config)
    assert config_shapes(path).task == "sequence-classification"
    assert config_shapes(path, "causal-lm").task == "causal-lm"


@pytest.mark.parametrize(
    "config",
    [
        tiny_config("opt"),
        tiny_config("bert"),
        GPT2Config(n_embd=32, n_layer=2, n_head=4, add_cross_attention=True),
        LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, architectures=["LlamaModel"]),
    ],
    ids=["opt", "bert", "gpt2-cross-attention", "bare-llama-model"],
)
def test_what_is_not_modelled_gets_none(tmp_path, config):
    assert config_shapes(_write(tmp_path, config)) is None


def test_remote_code_and_non_dirs_get_none(tmp_path):
    config = json.loads(CONFIGS["llama-gqa"].to_json_string())
    (tmp_path / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    assert config_shapes(str(tmp_path), trust_remote_code=True) is None
    assert config_shapes(str(tmp_path)) is not None  # remote code not asked for: transformers' own class
    assert config_shapes("some-org/some-model") is None  # a hub id: the real path fetches the config
    assert config_shapes(str(tmp_path / "missing")) is None
    (tmp_path / "config.json").write_text("{not json")
    assert config_shapes(str(tmp_path)) is None


def test_count_from_config_dir_imports_no_torch(tmp_path):
    # What makes `peft count` fast: the whole command, table included, without torch or transformers.
    path = _write(tmp_path, CONFIGS["gpt2"])
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from peftcli.cli import app\n"
        f"r = CliRunner().invoke(app, ['count', {path!r}, '-m', 'lora', '-m', 'adapter', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(r.stdout)\n"
        "print([m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    rows_text, imported = out.rstrip().rsplit("\n", 1)
    assert imported == "[]"
    rows = json.loads(rows_text)
    expected = meta_counts(path, [make_config("lora"), make_config("adapter")])
    assert [(r["trainable"], r["total"]) for r in rows] == [(c.trainable, c.total) for c in expected]


# Hand-written config.json files, as found in the wild: aliases, nulls, missing keys, ties, labels.
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}
LLAMA = {**LLAMA, "num_attention_heads": 4, "vocab_size": 100}
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "vocab_size": 100}
CLS = "sequence-classification"


def M(name: str = "lora", **fields):
    return make_config(name, **fields)


ANSWERED = {  # the shapes answer, and equal injecting for real
    "qwen2 kv default is 32": ({**LLAMA, "model_type": "qwen2"}, None, M(target_modules=["k_proj"])),
    "qwen2 kv default, prefix": ({**LLAMA, "model_type": "qwen2"}, None, M(name="prefix-tuning")),
    "llama kv null": ({**LLAMA, "num_key_value_heads": None}, None, M(name="prefix-tuning")),
    "gpt2 aliases": (
        {"model_type": "gpt2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
        None,
        M(name="adapter"),
    ),
    "gpt2 alias wins": ({**GPT2, "hidden_size": 64, "max_position_embeddings": 16}, None, M()),
    "gpt2 tied, both saved": ({**GPT2}, None, M(modules_to_save=["wte", "lm_head"])),
    "llama tied, both saved": (
        {**LLAMA, "tie_word_embeddings": True},
        None,
        M(modules_to_save=["embed_tokens", "lm_head"]),
    ),
    "num_labels": ({**LLAMA, "num_labels": 5}, CLS, M()),
    "id2label": ({**LLAMA, "id2label": {"0": "a", "1": "b", "2": "c"}}, CLS, M(name="prompt-tuning")),
    "empty modules_to_save": (LLAMA, None, M(modules_to_save=[])),
    "nested modules_to_save": (LLAMA, None, M(modules_to_save=["mlp", "act_fn"])),
    "adapter all-linear, head saved": (
        GPT2,
        None,
        M(name="adapter", target_modules="all-linear", modules_to_save=["lm_head"]),
    ),
}

DEFERRED = {  # the shapes must not answer: transformers refuses, or reads what they do not model
    "gpt2 head_dim (prefix reads it)": ({**GPT2, "head_dim": 4}, None, M(name="prefix-tuning")),
    "labels disagree": ({**LLAMA, "num_labels": 5, "id2label": {"0": "a", "1": "b"}}, CLS, M()),
    "heads do not divide": ({**LLAMA, "num_attention_heads": 5, "head_dim": 8}, None, M()),
    "qwen2 head_dim null": ({**LLAMA, "model_type": "qwen2", "head_dim": None}, None, M()),
    "float size": ({**LLAMA, "hidden_size": 32.0}, None, M()),
    "string flag": ({**LLAMA, "attention_bias": "false"}, None, M()),
    "string tie flag": ({**LLAMA, "tie_word_embeddings": "false"}, None, M()),
    "gpt2 n_inner 0": ({**GPT2, "n_inner": 0}, None, M()),
    "unknown class": ({**LLAMA, "architectures": ["LlamaForTokenClassification"]}, None, M()),
    "malformed architectures": ({**LLAMA, "architectures": {"x": 1}}, None, M()),
    "padding id outside the vocabulary": ({**LLAMA, "pad_token_id": 100}, None, M()),
    "adapter target saved": (
        {**LLAMA, "attention_bias": True},
        CLS,
        M(name="adapter", target_modules=["score", "o_proj"]),
    ),
}


def _shape_answer(tmp_path, config, task, method):
    (tmp_path / "config.json").write_text(json.dumps(config))
    shapes = config_shapes(str(tmp_path), task)
    if shapes is None:
        return None
    try:
        return shape_count(shapes, method)
    except (NotModelled, UserError):
        return None


@pytest.mark.parametrize("case", list(ANSWERED))
def test_hand_written_configs_count_as_injecting(tmp_path, case):
    config, task, method = ANSWERED[case]
    answer = _shape_answer(tmp_path, config, task, method)
    assert answer is not None
    assert answer == meta_counts(str(tmp_path), [method], task)[0]


@pytest.mark.parametrize("case", list(DEFERRED))
def test_what_transformers_would_refuse_or_read_differently_is_deferred(tmp_path, case):
    assert _shape_answer(tmp_path, *DEFERRED[case]) is None


def test_adapter_activations_are_the_recipe_choices():
    # the shape count checks the recipe's choices where inject() checks its table: they must be one list
    from peftcli.methods import adapter
    from peftcli.methods.adapter import ACTIVATIONS
    from peftcli.methods.base import choices

    assert set(ACTIVATIONS) == set(choices(adapter.Config, "activation"))


# GGUF files: the metadata transformers turns into a config (gguf_header.py reads it without torch).


def _gguf(tmp_path, arch="llama", name="tiny", tensors=("token_embd.weight",), **overrides):
    from gguf import GGUFValueType as T
    from tiny import write_gguf as _write

    values = {
        f"{arch}.block_count": (T.UINT32, 2),
        f"{arch}.embedding_length": (T.UINT32, 32),
        f"{arch}.feed_forward_length": (T.UINT32, 48),
        f"{arch}.attention.head_count": (T.UINT32, 4),
        f"{arch}.attention.head_count_kv": (T.UINT32, 2),
        f"{arch}.context_length": (T.UINT32, 64),
        "tokenizer.ggml.model": (T.STRING, "gpt2"),
        "tokenizer.ggml.tokens": (T.ARRAY, [f"t{i}" for i in range(100)]),  # no vocab_size key: its length
        "tokenizer.ggml.merges": (T.ARRAY, ["t 1"]),
        "general.name": (T.STRING, name),
        **overrides,
    }
    tmp_path.mkdir(exist_ok=True)
    return _write(tmp_path / "model.gguf", values, arch=arch, tensors=tensors)


@pytest.mark.parametrize("tensors", [("token_embd.weight",), ("token_embd.weight", "output.weight")])
def test_gguf_shapes_equal_the_meta_model(tmp_path, tensors):
    path = _gguf(tmp_path, tensors=tensors)  # without an output tensor the embedding serves as the head
    shapes = config_shapes(path)
    _assert_same_model(shapes, meta_model(resolve(path)))
    assert (shapes.params["lm_head.weight"][0] == "lm_head.weight") == ("output.weight" in tensors)


@pytest.mark.parametrize("task", TASKS)
def test_packaged_encoder_counts_as_injecting(task):
    _assert_counts_as_injecting("all-minilm-l6-v2", task)  # its config names BertModel


def test_packaged_gguf_counts_as_injecting():
    _assert_counts_as_injecting("smollm2-135m-instruct", None)


def test_gguf_not_modelled_gets_none(tmp_path):
    from gguf import GGUFValueType as T

    assert config_shapes(_gguf(tmp_path / "a", arch="gpt2")) is None
    assert config_shapes(_gguf(tmp_path / "b", name="Mistral 7B Instruct")) is None  # read as Mistral
    per_layer = {"llama.attention.head_count_kv": (T.ARRAY, [2, 2])}
    assert config_shapes(_gguf(tmp_path / "c", **per_layer)) is None
    (tmp_path / "d.gguf").write_bytes(b"GGUF" + bytes(8))
    assert config_shapes(str(tmp_path / "d.gguf")) is None
    refused_or_read_otherwise = {
        "another architecture's key": {"qwen2.block_count": (T.UINT32, 1)},  # transformers maps it too
        "one-token vocabulary": {"tokenizer.ggml.tokens": (T.ARRAY, ["abcdefg"])},  # unwrapped to a string
        "name as an array": {"general.name": (T.ARRAY, ["mistral"])},  # transformers' Mistral patch
        "padding id outside": {"tokenizer.ggml.padding_token_id": (T.UINT32, 100)},
        "string context length": {"llama.context_length": (T.STRING, "64")},
    }
    for i, overrides in enumerate(refused_or_read_otherwise.values()):
        assert config_shapes(_gguf(tmp_path / f"e{i}", **overrides)) is None, overrides
    assert config_shapes(_gguf(tmp_path / "f", **{"tokenizer.ggml.padding_token_id": (T.UINT32, 99)}))
