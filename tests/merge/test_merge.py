"""`peft merge` against the unmerged model, against HF PEFT's merge_and_unload, and against itself
(streaming vs in memory); the written dir loads with plain transformers; bad inputs leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import HF_TASK, batch, logits, randomise, save_tiny, tiny_config, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.errors import CheckFailed, UserError
from peftcli.merge import to_dir as merge
from peftcli.methods import METHODS, Context, MethodConfig, lora, make_config
from peftcli.models import load as models
from peftcli.models.shards import INDEX_NAME, SINGLE_NAME
from peftcli.models.sources import resolve
from peftcli.runs import adapter as checkpoint

runner = CliRunner()
CLASSIFY = "sequence-classification"
LABELS = ["neg", "neutral", "pos"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny base dirs: llama and gpt2 in many small shards (what streaming is for), bert in one file."""
    root = tmp_path_factory.mktemp("bases")
    for arch in ("llama", "gpt2"):
        tiny_model(arch).save_pretrained(root / arch, max_shard_size="50KB")
        tiny_tokenizer().save_pretrained(root / arch)
    save_tiny(root / "bert", "bert")
    assert len(list((root / "llama").glob("model-*.safetensors"))) > 3
    return {arch: root / arch for arch in ("llama", "gpt2", "bert")}


def make_adapter(directory: Path, base: Path, task: str, section: MethodConfig, labels=None) -> torch.Tensor:
    """Save a random adapter of `section` on `base`; returns base + adapter's logits on tiny.batch()."""
    model = models.load_model(resolve(str(base)), task, label_names=labels)
    model = METHODS[section.name].inject(model, section, Context(task))
    randomise(model, scale=0.1)  # non-zero B, a perturbed head/bias: a delta or replacement left out shows
    checkpoint.save_adapter(model, section, task, str(base), directory, label_names=labels)
    with torch.no_grad():
        return model(**batch()).logits


def load_merged(directory: Path, task: str = "causal-lm"):
    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    return cls.from_pretrained(directory).eval()


def written_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.endswith(".tmp")]


LORA_ALL = make_config("lora", rank=4, alpha=8.0, target_modules="all-linear")
LORA_DEFAULT = make_config("lora", rank=4, alpha=8.0)
DORA_ALL = make_config("lora", rank=4, alpha=8.0, target_modules="all-linear", use_dora=True)
DORA_DEFAULT = make_config("lora", rank=4, alpha=8.0, use_dora=True)
# trained on the residual base, saved converted: the merge into the original base is the trained model
PISSA_ALL = make_config("lora", rank=4, alpha=8.0, target_modules="all-linear", init="pissa")
OLORA_DEFAULT = make_config("lora", rank=4, alpha=8.0, init="olora", use_dora=True)


# --------------------------------------------------------------------------------------------------
# Merged = unmerged


@pytest.mark.parametrize(
    ("arch", "task", "section"),
    [
        ("llama", "causal-lm", LORA_ALL),
        ("gpt2", "causal-lm", LORA_DEFAULT),
        ("bert", CLASSIFY, LORA_DEFAULT),
        ("llama", "causal-lm", DORA_ALL),
        ("gpt2", "causal-lm", DORA_DEFAULT),
        ("bert", CLASSIFY, DORA_DEFAULT),
        ("llama", "causal-lm", PISSA_ALL),
        ("gpt2", "causal-lm", OLORA_DEFAULT),
    ],
    ids=[
        "llama-all-linear",
        "gpt2-conv1d",
        "bert-classifier",
        "dora-llama",
        "dora-gpt2",
        "dora-bert",
        "pissa-llama",
        "olora-dora-gpt2",
    ],
)
def test_merged_logits_equal_base_plus_adapter(tmp_path, bases, arch, task, section):
    labels = LABELS if task == CLASSIFY else None
    expected = make_adapter(tmp_path / "adapter", bases[arch], task, section, labels)
    result = merge.merge_to_dir(tmp_path / "adapter", tmp_path / "merged")
    assert result.streamed and result.dtype == torch.float32 and result.max_abs_diff <= 1e-4
    merged = load_merged(tmp_path / "merged", task)
    assert not any(type(m).__module__.startswith("peftcli") for m in merged.modules())
    assert (logits(merged) - expected).abs().max() <= 1e-5
    assert (logits(merged) - logits(tiny_model(arch, task))).abs().max() > 1e-3  # the adapter did matter
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == [type(merged).__name__]
    if task == CLASSIFY:
        assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    sharded = arch != "bert"
    assert (tmp_path / "merged" / INDEX_NAME).is_file() == sharded
    assert (tmp_path / "merged" / SINGLE_NAME).is_file() != sharded
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tiny_tokenizer().chat_template


def test_merged_dir_loads_without_peftcli(tmp_path, bases):
    """A fresh interpreter where `import peftcli` fails loads the merged dir and gives the same logits."""
    expected = make_adapter(tmp_path / "adapter", bases["llama"], "causal-lm", LORA_ALL)
    merge.merge_to_dir(tmp_path / "adapter", tmp_path / "merged")
    save_file(batch(), tmp_path / "batch.safetensors")
    code = (
        "import sys; sys.modules['peftcli'] = None\n"
        "try:\n    import peftcli\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('peftcli importable')\n"
        "import torch\nfrom safetensors.torch import load_file, save_file\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"d = {str(tmp_path)!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(d + '/merged').eval()\n"
        "AutoTokenizer.from_pretrained(d + '/merged')\n"
        "with torch.no_grad():\n"
        "    out = model(**load_file(d + '/batch.safetensors')).logits\n"
        "save_file({'logits': out.contiguous()}, d + '/out.safetensors')\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (load_file(tmp_path / "out.safetensors")["logits"] - expected).abs().max() <= 1e-5


def test_train_output_dir_keeps_its_tokenizer_and_labels(tmp_path, bases):
    """A `peft train` output dir: the tokenizer at its root (not the base's) and labels.json's names."""
    run = tmp_path / "run"
    make_adapter(run, bases["bert"], CLASSIFY, make_config("lora", rank=4), ["bad", "good"])
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<run-only>"])
    tokenizer.save_pretrained(run)
    merge.merge_to_dir(run, tmp_path / "merged")
    assert "<run-only>" in AutoTokenizer.from_pretrained(tmp_path / "merged").get_vocab()
    merged = load_merged(tmp_path / "merged", CLASSIFY)
    assert merged.config.num_labels == 2 and merged.config.id2label == {0: "bad", 1: "good"}


# --------------------------------------------------------------------------------------------------
# Against HF PEFT


@pytest.mark.parametrize(
    ("arch", "task", "fields"),
    [
        ("llama", "causal-lm", {"target_modules": "all-linear"}),
        ("gpt2", "causal-lm", {}),
        ("bert", CLASSIFY, {}),
        (
            "llama",
            "causal-lm",
            {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "lora_alpha": 12},
        ),
        ("llama", "causal-lm", {"target_modules": "all-linear", "use_dora": True}),
        ("gpt2", "causal-lm", {"use_dora": True}),
        ("bert", CLASSIFY, {"use_dora": True}),
        # saved unconverted: the merge takes the principal part out of the stored weights itself
        ("llama", "causal-lm", {"target_modules": "all-linear", "init_lora_weights": "pissa"}),
        ("bert", CLASSIFY, {"init_lora_weights": "olora", "use_dora": True}),
    ],
    ids=[
        "llama",
        "gpt2-conv1d",
        "bert-head",
        "llama-rslora",
        "dora",
        "dora-gpt2",
        "dora-bert",
        "pissa",
        "olora",
    ],
)
def test_hf_adapter_merges_like_hf_merge_and_unload(tmp_path, bases, arch, task, fields):
    """HF PEFT makes the adapter (random non-zero B); our merge writes HF's merged weights and logits."""
    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    config = peft.LoraConfig(
        task_type=HF_TASK[task], r=4, **{"init_lora_weights": False, "lora_alpha": 8, **fields}
    )
    hf = peft.get_peft_model(cls.from_pretrained(bases[arch]), config)
    randomise(hf, scale=0.05)  # the head too: modules_to_save must replace the base's
    hf.save_pretrained(tmp_path / "adapter")
    hf.eval()
    expected = logits(hf)
    hf_merged = hf.merge_and_unload().state_dict()

    merge.merge_to_dir(tmp_path / "adapter", tmp_path / "merged")
    ours = written_tensors(tmp_path / "merged")
    tied = set(hf_merged) - set(ours)
    assert tied <= {"lm_head.weight"} and (arch == "gpt2") == bool(tied)
    for key, tensor in ours.items():
        assert (tensor - hf_merged[key]).abs().max() <= 1e-6, key
    assert (logits(load_merged(tmp_path / "merged", task)) - expected).abs().max() <= 1e-5


def test_rslora_scale_is_alpha_over_sqrt_rank(tmp_path, bases):
    """Our rsLoRA adapter: the folded delta is alpha / sqrt(r) * B @ A, not alpha / r."""
    section = make_config("lora", rank=4, alpha=8.0, target_modules=["q_proj"], use_rslora=True)
    expected = make_adapter(tmp_path / "adapter", bases["llama"], "causal-lm", section)
    merge.merge_to_dir(tmp_path / "adapter", tmp_path / "merged")
    state = load_file(tmp_path / "adapter" / checkpoint.WEIGHTS_NAME)
    key = "model.layers.0.self_attn.q_proj"
    lora_a, lora_b = (
        state[f"base_model.model.{key}.lora_A.weight"],
        state[f"base_model.model.{key}.lora_B.weight"],
    )
    base = written_tensors(bases["llama"])[f"{key}.weight"]
    torch.testing.assert_close(
        written_tensors(tmp_path / "merged")[f"{key}.weight"], base + 4.0 * lora_b @ lora_a
    )
    assert (logits(load_merged(tmp_path / "merged")) - expected).abs().max() <= 1e-5


def test_bitfit_biases_replace_the_base_biases(tmp_path, bases):
    expected = make_adapter(tmp_path / "adapter", bases["bert"], CLASSIFY, make_config("bitfit"), LABELS)
    merge.merge_to_dir(tmp_path / "adapter", tmp_path / "merged")
    merged, adapter = (
        written_tensors(tmp_path / "merged"),
        load_file(tmp_path / "adapter" / checkpoint.WEIGHTS_NAME),
    )
    assert len(adapter) > 10
    for key, tensor in adapter.items():
        assert torch.equal(merged[key.removeprefix("base_model.model.")], tensor), key
    assert (logits(load_merged(tmp_path / "merged", CLASSIFY)) - expected).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------------------
# Streaming = in memory


@pytest.mark.parametrize(
    ("arch", "section"),
    [("llama", LORA_ALL), ("gpt2", LORA_DEFAULT), ("llama", DORA_ALL), ("gpt2", DORA_DEFAULT)],
)
def test_streaming_writes_what_merging_the_loaded_model_writes(tmp_path, bases, arch, section, monkeypatch):
    make_adapter(tmp_path / "adapter", bases[arch], "causal-lm", section)
    model, _ = checkpoint.load_adapter(models.load_model(resolve(str(bases[arch]))), tmp_path / "adapter")
    expected = lora.merge(model).state_dict()

    streamed = merge.merge_to_dir(tmp_path / "adapter", tmp_path / "streamed")
    assert streamed.streamed and len(list((tmp_path / "streamed").glob("model-*.safetensors"))) > 3
    monkeypatch.setattr(merge, "safetensors_shards", lambda source: None)
    in_memory = merge.merge_to_dir(tmp_path / "adapter", tmp_path / "in-memory")
    assert not in_memory.streamed

    for directory in ("streamed", "in-memory"):
        written = written_tensors(tmp_path / directory)
        assert set(written) == set(expected) - ({"lm_head.weight"} if arch == "gpt2" else set())
        for key, tensor in written.items():
            assert torch.equal(tensor, expected[key]), (directory, key)


LAYER_METHODS = [
    ("llama", make_config("ia3")),
    ("gpt2", make_config("ia3")),  # Conv1D layers with biases: the output scale folds into them too
    ("bert", make_config("ia3")),
    ("llama", make_config("vera", rank=4, target_modules="all-linear")),
    ("gpt2", make_config("vera", rank=4, save_projection=False)),  # projections drawn again from the key
    ("llama", make_config("loha", rank=2)),
    ("llama", make_config("lokr", rank=2, target_modules="all-linear")),
    ("gpt2", make_config("oft", block_size=8)),
    ("bert", make_config("oft", num_blocks=4, use_cayley_neumann=False)),
]


@pytest.mark.parametrize(
    ("arch", "section"), LAYER_METHODS, ids=[f"{a}-{s.name}-{i}" for i, (a, s) in enumerate(LAYER_METHODS)]
)
def test_layer_methods_stream_what_they_merge_in_memory(tmp_path, bases, arch, section, monkeypatch):
    """Each method's fold, tensor by tensor (VeRA's shared projections, IA3's biases included), writes what
    its merge of the loaded model writes, and the check passes."""
    task = CLASSIFY if arch == "bert" else "causal-lm"
    labels = LABELS if arch == "bert" else None
    expected_logits = make_adapter(tmp_path / "adapter", bases[arch], task, section, labels)
    model = models.load_model(resolve(str(bases[arch])), task, label_names=labels)
    model, _ = checkpoint.load_adapter(model, tmp_path / "adapter")
    expected = METHODS[section.name].merge(model).state_dict()

    streamed = merge.merge_to_dir(tmp_path / "adapter", tmp_path / "streamed")
    assert streamed.streamed and streamed.max_abs_diff <= 1e-4
    monkeypatch.setattr(merge, "safetensors_shards", lambda source: None)
    assert not merge.merge_to_dir(tmp_path / "adapter", tmp_path / "in-memory").streamed
    for directory in ("streamed", "in-memory"):
        written = written_tensors(tmp_path / directory)
        assert set(written) == set(expected) - ({"lm_head.weight"} if arch == "gpt2" else set())
        for key, tensor in written.items():
            assert torch.equal(tensor, expected[key]), (directory, key)
    merged = load_merged(tmp_path / "streamed", task)
    assert (logits(merged) - expected_logits).abs().max() <= 1e-5
    assert (logits(merged) - logits(tiny_model(arch, task))).abs().max() > 1e-3  # the adapter did matter


@pytest.mark.parametrize("streamed", [True, False])
def test_trained_embedding_unties_it_from_the_head(tmp_path, bases, streamed, monkeypatch):
    """gpt2 ties lm_head to wte; training wte in full (modules_to_save) leaves lm_head with the base's."""
    section = make_config("lora", rank=4, modules_to_save=["wte"])
    expected = make_adapter(tmp_path / "adapter", bases["gpt2"], "causal-lm", section)
    if not streamed:
        monkeypatch.setattr(merge, "safetensors_shards", lambda source: None)
    assert merge.merge_to_dir(tmp_path / "adapter", tmp_path / "merged").streamed == streamed
    written = written_tensors(tmp_path / "merged")
    base = written_tensors(bases["gpt2"])["transformer.wte.weight"]
    assert torch.equal(written["lm_head.weight"], base) and not torch.equal(
        written["transformer.wte.weight"], base
    )
    merged = load_merged(tmp_path / "merged")
    assert merged.config.tie_word_embeddings is False
    assert (logits(merged) - expected).abs().max() <= 1e-5


def test_lora_on_a_tied_head_is_refused(tmp_path, bases):
    section = make_config("lora", rank=4, target_modules=["c_attn", "lm_head"])
    make_adapter(tmp_path / "adapter", bases["gpt2"], "causal-lm", section)
    with pytest.raises(UserError, match="lm_head.*shared"):
        merge.merge_to_dir(tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not leftovers(tmp_path)


def test_bf16_output(tmp_path, bases):
    expected = make_adapter(tmp_path / "adapter", bases["llama"], "causal-lm", LORA_ALL)
    result = merge.merge_to_dir(tmp_path / "adapter", tmp_path / "merged", dtype="bf16")
    assert result.dtype == torch.bfloat16 and 0 < result.max_abs_diff <= result.tolerance
    reference, _ = checkpoint.load_adapter(
        models.load_model(resolve(str(bases["llama"]))), tmp_path / "adapter"
    )
    probe_logits = merge.logits_of(reference, merge.probe_batch(reference.config))
    assert result.tolerance == pytest.approx(5e-2 * max(1.0, float(probe_logits.abs().max())), rel=1e-5)
    assert (logits(load_merged(tmp_path / "merged")) - expected).abs().max() <= result.tolerance
    assert {t.dtype for t in written_tensors(tmp_path / "merged").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    # and the default keeps a bf16 base bf16: merge that output's base again
    bf16_base = tmp_path / "bf16-base"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(bf16_base)
    tiny_tokenizer().save_pretrained(bf16_base)
    assert (
        merge.merge_to_dir(tmp_path / "adapter", tmp_path / "again", base=str(bf16_base)).dtype
        == torch.bfloat16
    )


def test_a_base_model_checkpoint_without_the_head_prefix(tmp_path, bases):
    """A LlamaModel checkpoint stores `layers.0...`; the adapter says `model.layers.0...`."""
    make_adapter(tmp_path / "adapter", bases["bert"], CLASSIFY, make_config("lora", rank=4), LABELS)
    bare = tmp_path / "bert-model"
    load_merged(bases["bert"], CLASSIFY).bert.save_pretrained(bare)  # BertModel: no `bert.` prefix, no head
    assert not any(k.startswith("bert.") for k in written_tensors(bare))
    result = merge.merge_to_dir(tmp_path / "adapter", tmp_path / "merged", base=str(bare))
    assert result.streamed and "bert.embeddings.word_embeddings.weight" in written_tensors(
        tmp_path / "merged"
    )


# --------------------------------------------------------------------------------------------------
# Bad inputs: a clear message, exit 2 (1 for a failed check), and nothing at --output


def cli_merge(*args: str):
    return runner.invoke(app, ["merge", *map(str, args)])


def test_output_that_exists_is_left_alone(tmp_path, bases):
    make_adapter(tmp_path / "adapter", bases["llama"], "causal-lm", LORA_DEFAULT)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = cli_merge(tmp_path / "adapter", "--output", tmp_path / "out")
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_adapter_dir_without_weights(tmp_path, bases):
    make_adapter(tmp_path / "adapter", bases["llama"], "causal-lm", LORA_DEFAULT)
    (tmp_path / "adapter" / checkpoint.WEIGHTS_NAME).unlink()
    result = cli_merge(tmp_path / "adapter", "--output", tmp_path / "out")
    assert result.exit_code == 2 and "holds no adapter_model.safetensors" in result.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_base_whose_shapes_do_not_match(tmp_path, bases):
    make_adapter(tmp_path / "adapter", bases["llama"], "causal-lm", LORA_DEFAULT)
    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size = 32, 48
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "other")
    result = cli_merge(tmp_path / "adapter", "--output", tmp_path / "out", "--base", tmp_path / "other")
    assert result.exit_code == 2 and "shape" in result.stderr and "another base model" in result.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(
    ("section", "why"),
    [
        (make_config("prefix-tuning", num_virtual_tokens=4), "prefix tuning adds key/value positions"),
        (make_config("prompt-tuning", num_virtual_tokens=4), "prompt tuning adds input positions"),
        (make_config("adapter"), "non-linear"),
    ],
    ids=["prefix", "prompt", "bottleneck"],
)
def test_unmergeable_method(tmp_path, bases, section, why):
    make_adapter(tmp_path / "adapter", bases["llama"], "causal-lm", section)
    result = cli_merge(tmp_path / "adapter", "--output", tmp_path / "out")
    assert (
        result.exit_code == 2 and "cannot merge" in result.stderr and why in " ".join(result.stderr.split())
    )
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_unknown_dtype_and_missing_base(tmp_path, bases):
    make_adapter(tmp_path / "adapter", bases["llama"], "causal-lm", LORA_DEFAULT)
    result = cli_merge(tmp_path / "adapter", "--output", tmp_path / "out", "--dtype", "int8")
    assert result.exit_code == 2 and "--dtype" in result.stderr
    result = cli_merge(tmp_path / "adapter", "--output", tmp_path / "out", "--base", tmp_path / "nowhere")
    assert result.exit_code == 2 and "not found" in result.stderr and "nowhere" in result.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_a_failed_check_exits_1_and_writes_nothing(tmp_path, bases, monkeypatch):
    make_adapter(tmp_path / "adapter", bases["llama"], "causal-lm", LORA_DEFAULT)
    real = lora.fold_weight
    monkeypatch.setattr(
        lora, "fold_weight", lambda w, a, b, scale, *rest: real(w, a, b, 2 * scale, *rest)
    )  # a bug
    result = cli_merge(tmp_path / "adapter", "--output", tmp_path / "out")
    assert result.exit_code == 1 and "differ from base + adapter" in result.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    with pytest.raises(CheckFailed):
        merge.merge_to_dir(tmp_path / "adapter", tmp_path / "out")
    assert merge.merge_to_dir(tmp_path / "adapter", tmp_path / "out", verify=False).max_abs_diff is None


# --------------------------------------------------------------------------------------------------
# A GGUF base (the packaged SmolLM2): merged in memory, written as safetensors


@pytest.mark.slow
def test_gguf_base_merges_to_safetensors(tmp_path):
    name = "smollm2-135m-instruct"
    section = make_config("lora", rank=4, target_modules=["q_proj", "v_proj"])
    model = METHODS["lora"].inject(models.load_model(resolve(name)), section, Context("causal-lm"))
    randomise(model, scale=0.02)
    checkpoint.save_adapter(model, section, "causal-lm", name, tmp_path / "adapter")
    del model
    result = merge.merge_to_dir(tmp_path / "adapter", tmp_path / "merged")
    assert not result.streamed and result.dtype == torch.float32 and result.max_abs_diff <= 1e-4
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert list((tmp_path / "merged").glob("*.safetensors")) and not list(
        (tmp_path / "merged").glob("*.gguf")
    )
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template
